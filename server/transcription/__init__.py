"""Speech to text: audio decoding and whisper transcription."""

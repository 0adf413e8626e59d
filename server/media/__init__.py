"""Images for vision requests: decoding with size limits and safe fetching of remote URLs."""

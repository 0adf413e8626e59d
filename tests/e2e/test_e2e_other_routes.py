"""Responses, transcription and images in chat through the real stack, with the official SDKs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import huggingface_hub.constants
import openai
import pytest
from huggingface_hub import InferenceClient
from PIL import Image

from e2e.stack import DemoStack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
IMAGE_TOKENS = (224 // 16) ** 2  # the demo vision tower: 224 px images, 16 px patches


@pytest.fixture(scope="module")
def client(demo_stack: DemoStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_stack.base_url, api_key="unused", max_retries=0, timeout=120)


def test_responses_non_stream(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    response = client.responses.create(
        model=demo_stack.chat_model, input="What is the capital of France?", temperature=0, max_output_tokens=12
    )
    assert response.status == "completed"
    assert "Paris" in response.output_text
    assert response.usage is not None and response.usage.output_tokens >= 1


def test_responses_stream_event_order(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    events = list(
        client.responses.create(
            model=demo_stack.chat_model,
            input="What is the capital of France?",
            temperature=0,
            max_output_tokens=12,
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    for earlier, later in [
        ("response.output_item.added", "response.content_part.added"),
        ("response.content_part.added", "response.output_text.delta"),
        ("response.output_text.delta", "response.output_text.done"),
        ("response.output_text.done", "response.content_part.done"),
        ("response.content_part.done", "response.output_item.done"),
        ("response.output_item.done", "response.completed"),
    ]:
        assert earlier in kinds and later in kinds, kinds
        assert max(i for i, kind in enumerate(kinds) if kind == earlier) < kinds.index(later) or (earlier == later), (
            f"{earlier} must come before {later}: {kinds}"
        )
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    done = next(event for event in events if event.type == "response.output_text.done")
    assert deltas == done.text and "Paris" in deltas
    sequence_numbers = [event.sequence_number for event in events]
    assert sequence_numbers == sorted(sequence_numbers)


def test_transcription_of_spoken_clip(client: openai.OpenAI, demo_stack: DemoStack, spoken_clip: Path) -> None:
    with spoken_clip.open("rb") as audio:
        result = client.audio.transcriptions.create(model=demo_stack.speech_model, file=audio)
    assert "quick brown fox" in result.text.lower()


def test_non_audio_upload_is_bad_request(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model=demo_stack.speech_model, file=("notes.wav", b"not audio at all"))


def _png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_image_in_chat_counts_image_tokens(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    text_part = {"type": "text", "text": "What is in this picture?"}
    with_image = client.chat.completions.create(
        model=demo_stack.vision_model,
        messages=[
            {"role": "user", "content": [text_part, {"type": "image_url", "image_url": {"url": _png_data_url()}}]}
        ],
        temperature=0,
        max_tokens=8,
    )
    text_only = client.chat.completions.create(
        model=demo_stack.vision_model, messages=[{"role": "user", "content": [text_part]}], temperature=0, max_tokens=8
    )
    assert with_image.choices[0].finish_reason in ("stop", "length")
    assert with_image.usage is not None and text_only.usage is not None
    added = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert IMAGE_TOKENS <= added <= IMAGE_TOKENS + 4, f"the image added {added} prompt tokens"


def test_invalid_base64_image_is_bad_request(client: openai.OpenAI, demo_stack: DemoStack) -> None:
    broken = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=demo_stack.vision_model, messages=[{"role": "user", "content": [broken]}], max_tokens=4
        )


def test_inference_client_chat_completion(demo_stack: DemoStack, monkeypatch: pytest.MonkeyPatch) -> None:
    # HF_HUB_OFFLINE (set for the whole suite) also blocks InferenceClient's calls to our loopback server.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub_client = InferenceClient(base_url=demo_stack.base_url, api_key="unused", timeout=120)
    reply = hub_client.chat_completion(QUESTION, model=demo_stack.chat_model, temperature=0, max_tokens=12)
    assert "Paris" in (reply.choices[0].message.content or "")
    chunks = list(
        hub_client.chat_completion(QUESTION, model=demo_stack.chat_model, temperature=0, max_tokens=12, stream=True)
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason in ("stop", "length")

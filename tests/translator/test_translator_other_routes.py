"""Legacy completions, the Responses API, models, metrics and openapi through real clients."""

from __future__ import annotations

import asyncio

import openai
import pytest
from fake_upstream import CREATED, MODEL_ID, FakeUpstream, text_chunks, text_result
from protoserve.translator.app import ROUTES
from protoserve.translator.server import RunningTranslator
from protoserve.v1 import common_pb2, generation_pb2, models_pb2


def client_for(translator: RunningTranslator) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{translator.url}/v1", api_key="unused", max_retries=0)


async def test_completions_non_stream_and_stream(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    client = client_for(translator)
    reply = await client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=4, stop=["\n", "."])
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == "Hello" and reply.usage.total_tokens == 7
    request = upstream.requests_of("GenerateUnary")[0]
    assert request.text == "Once" and request.sampling.max_tokens == 4 and list(request.sampling.stop) == ["\n", "."]
    stream = await client.completions.create(
        model=MODEL_ID, prompt=[1, 2, 3], stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == "Hello"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 5
    assert list(upstream.requests_of("Generate")[0].token_ids.ids) == [1, 2, 3]
    await client.completions.create(model=MODEL_ID, prompt=["only one"])
    assert upstream.requests_of("GenerateUnary")[1].text == "only one"


async def test_completions_logprobs_and_refusals(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    upstream.result.choices[0].logprobs.append(
        common_pb2.TokenLogprob(
            token="He", logprob=-0.5, top_logprobs=[common_pb2.TopLogprob(token="He", logprob=-0.5)]
        )
    )
    client = client_for(translator)
    reply = await client.completions.create(model=MODEL_ID, prompt="x", logprobs=1)
    assert reply.choices[0].logprobs.tokens == ["He"] and reply.choices[0].logprobs.top_logprobs == [{"He": -0.5}]
    assert upstream.requests_of("GenerateUnary")[0].sampling.top_logprobs == 1
    for extra, param in (({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL_ID, prompt="x", **extra)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL_ID, prompt=["one", "two"])


async def test_responses_non_stream(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    upstream.result = text_result("Bonjour")
    upstream.result.choices[0].tool_calls.append(
        generation_pb2.ToolCall(
            id="call_1", type="function", function=generation_pb2.FunctionCall(name="lookup", arguments="{}")
        )
    )
    client = client_for(translator)
    response = await client.responses.create(
        model=MODEL_ID,
        instructions="Answer in French.",
        max_output_tokens=20,
        temperature=0.3,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Hello"},
                    {"type": "input_image", "image_url": "https://example.com/cat.png"},
                ],
            }
        ],
        tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}],
    )
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.output_text == "Bonjour"
    assert response.output[1].type == "function_call" and response.output[1].call_id == "call_1"
    assert response.usage.input_tokens == 5 and response.usage.output_tokens == 2
    request = upstream.requests_of("ChatUnary")[0]
    assert [message.role for message in request.messages] == ["system", "user"]
    assert request.messages[1].content[1].image.url == "https://example.com/cat.png"
    assert request.sampling.max_tokens == 20 and request.tools[0].function.name == "lookup"


async def test_responses_stream_event_order(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    call = generation_pb2.ChoiceDelta(
        index=0,
        tool_calls=[generation_pb2.ToolCallDelta(index=0, id="call_7", name="lookup", arguments='{"q": 1}')],
        finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS,
    )
    upstream.chunks = text_chunks(["Bon", "jour"], finish=common_pb2.FINISH_REASON_UNSPECIFIED)
    upstream.chunks.append(generation_pb2.GenerationChunk(model=MODEL_ID, created=CREATED, choices=[call]))
    client = client_for(translator)
    stream = await client.responses.create(model=MODEL_ID, input="Hello", stream=True)
    events = [event async for event in stream]
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[6].text == "Bonjour"
    completed = events[-1].response
    assert completed.output_text == "Bonjour" and completed.output[1].arguments == '{"q": 1}'
    assert completed.usage.output_tokens == 2


async def test_responses_stream_cut_off_by_the_token_limit_ends_incomplete(
    translator: RunningTranslator, upstream: FakeUpstream
) -> None:
    upstream.chunks = text_chunks(["Bon", "jour"], finish=common_pb2.FINISH_REASON_LENGTH)
    stream = await client_for(translator).responses.create(
        model=MODEL_ID, input="Hello", stream=True, max_output_tokens=2
    )
    events = [event async for event in stream]
    assert [event.type for event in events][-2:] == ["response.output_item.done", "response.incomplete"]
    assert events[-2].item.status == "incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == "Bonjour" and final.output[0].status == "incomplete"


async def test_responses_refuses_previous_response_id(translator: RunningTranslator) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client_for(translator).responses.create(model=MODEL_ID, input="x", previous_response_id="resp_1")
    assert caught.value.body["param"] == "previous_response_id"


async def test_models_list_and_retrieve(translator: RunningTranslator, upstream: FakeUpstream) -> None:
    upstream.models.append(models_pb2.ModelInfo(id="plain", created=CREATED))
    client = client_for(translator)
    models = [model async for model in client.models.list()]
    assert [model.id for model in models] == [MODEL_ID, "plain"]
    assert models[0].owned_by == "org" and models[1].owned_by == "protoserve" and models[0].object == "model"
    model = await client.models.retrieve(MODEL_ID)  # the id holds a '/'
    assert model.id == MODEL_ID and model.model_extra["context_length"] == 2048
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("missing/model")


async def test_metrics_count_requests_and_streams(translator: RunningTranslator, http) -> None:
    await client_for(translator).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}])
    async with http.get(f"{translator.url}/nope"):
        pass
    async with http.get(f"{translator.url}/metrics") as response:
        text = await response.text()
    assert (
        'protoserve_translator_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in text
    )
    assert 'route="unmatched",status="404"' in text
    assert "protoserve_translator_streams_in_flight 0.0" in text
    assert "protoserve_translator_http_request_duration_seconds_bucket" in text


async def test_openapi_document_matches_routes(translator: RunningTranslator, http) -> None:
    async with http.get(f"{translator.url}/openapi.json") as response:
        document = await response.json()
    assert document["openapi"].startswith("3.1")
    served = {(method.lower(), path.replace("{model_id:.+}", "{model_id}")) for method, path, _ in ROUTES}
    documented = {
        (method, path) for path, item in document["paths"].items() for method in item if method != "parameters"
    }
    assert documented == served


async def test_huggingface_inference_client(
    translator: RunningTranslator, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import InferenceClient, constants

    # The suite runs with HF_HUB_OFFLINE=1 (no hub); these calls go only to the loopback translator.
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)

    client = InferenceClient(base_url=f"{translator.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Hi"}]

    def run() -> tuple[str, str]:
        whole = client.chat_completion(messages, model=MODEL_ID, max_tokens=5)
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat_completion(messages, model=MODEL_ID, stream=True)
            if chunk.choices
        )
        return whole.choices[0].message.content, streamed

    whole, streamed = await asyncio.to_thread(run)
    assert whole == streamed == "Hello"
    assert upstream.requests_of("ChatUnary")[0].sampling.max_tokens == 5
    assert upstream.requests_of("Chat")[0].model == MODEL_ID

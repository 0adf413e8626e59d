"""Rendering a model's chat template safely.

Templates come with the model (trusted); the conversation, tools and `chat_template_kwargs` come from
callers (untrusted). transformers renders templates in jinja's `ImmutableSandboxedEnvironment` and
rebuilds every input out of plain JSON types, so caller data can be read by the template but never
call into Python. On top of that, this module:
- keeps callers from choosing the template or the renderer's own options: a kwarg may only be a
  template variable, never `chat_template`, `tokenize`, `messages` and the like;
- passes on only the kwargs the template reads (anything else would reach a processor's own options,
  such as image sizes), caps their size, and caps the time one rendering may take;
- refuses a rendered prompt longer than `max_prompt_chars` before it is tokenized;
- tells what the generation prompt adds to a conversation (`generation_prompt_suffix`), so that a
  reasoning section is taken as opened only by the template, never by a message's own text;
- asks the tokenizer to encode control tokens found in caller text (`<|im_end|>` typed by a user) as
  plain text (`sanitize_control_tokens`), so a message cannot forge another role's turn;
- reports a template's own refusals (`raise_exception(...)`) as INVALID_ARGUMENT.
Rendering runs in a worker thread, so a long conversation never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import jinja2
import jinja2.meta
from protoserve.server.engine.errors import InvalidRequestError
from protoserve.server.limits import RequestLimits
from transformers.utils import chat_template_utils

_Result = TypeVar("_Result")
_VARIABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def _renderer_parameter_names() -> frozenset[str]:
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    names = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    names |= set(inspect.signature(ProcessorMixin.apply_chat_template).parameters)
    names |= set(inspect.signature(chat_template_utils.render_jinja_template).parameters)
    names |= {"messages", "kwargs", "self"}
    return frozenset(names)


RESERVED_TEMPLATE_KWARGS = _renderer_parameter_names()


def chat_template_of(tokenizer: Any, processor: Any | None) -> str | None:
    """The template a model's conversations are rendered with: the processor's, else the tokenizer's."""
    template = getattr(processor, "chat_template", None) if processor is not None else None
    template = template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def require_chat_template(tokenizer: Any, processor: Any | None, model_id: str) -> str:
    template = chat_template_of(tokenizer, processor)
    if template is None:
        raise InvalidRequestError(
            f"model {model_id!r} has no chat template, so it cannot answer Chat; "
            "use Generate with a raw prompt, or serve a model whose tokenizer has a chat template"
        )
    return template


@functools.lru_cache(maxsize=64)
def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from outside (parsed, never run)."""
    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(environment.parse(template)))
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own ({% generation %}): use its parser
        return chat_template_utils._get_template_variables(template)


def check_template_kwargs(kwargs: dict[str, Any], limits: RequestLimits, template: str) -> dict[str, Any]:
    """The caller kwargs the template reads, checked; kwargs the template never reads are dropped.

    Raises InvalidRequestError for a reserved or malformed name, or kwargs too large.
    """
    for name in kwargs:
        if name in RESERVED_TEMPLATE_KWARGS:
            raise InvalidRequestError(
                f"chat_template_kwargs.{name} is reserved by the server and cannot be set; "
                "pass only template variables such as enable_thinking"
            )
        if not _VARIABLE_NAME.fullmatch(name):
            raise InvalidRequestError(
                f"chat_template_kwargs key {name[:80]!r} is not a template variable name "
                "(a letter, then letters, digits or '_', at most 64 characters)"
            )
    size = len(json.dumps(kwargs))
    if size > limits.max_template_kwargs_chars:
        raise InvalidRequestError(
            f"chat_template_kwargs is {size} characters as JSON; at most {limits.max_template_kwargs_chars} allowed"
        )
    used = template_variables(template)
    return {name: value for name, value in kwargs.items() if name in used}


async def _run_bounded(work: Callable[[], _Result], limits: RequestLimits) -> _Result:
    try:
        return await asyncio.wait_for(asyncio.to_thread(work), timeout=limits.chat_template_timeout_s)
    except TimeoutError:
        raise InvalidRequestError(
            f"rendering the chat template took longer than {limits.chat_template_timeout_s} s; "
            "shorten the conversation or chat_template_kwargs"
        ) from None
    except InvalidRequestError:  # our own refusal from inside the work; already says what is wrong
        raise
    except jinja2.TemplateError as error:
        raise InvalidRequestError(f"the model's chat template refused this conversation: {error}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise InvalidRequestError(
            f"the model's chat template or processor could not handle this conversation: {error}"
        ) from None


def _template_text(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
    add_generation_prompt: bool = True,
) -> str:
    """The conversation rendered as text (blocking: call it in a worker thread)."""
    return str(
        tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )
    )


def _rendered_text(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
    limits: RequestLimits,
) -> str:
    """The rendered prompt text, refused when longer than `max_prompt_chars`. Runs in a worker thread."""
    text = _template_text(tokenizer, template, messages, tools=tools, template_kwargs=template_kwargs)
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"the rendered conversation has {len(text)} characters; at most {limits.max_prompt_chars} allowed"
        )
    return text


async def render_token_ids(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
    limits: RequestLimits,
) -> list[int]:
    """The prompt token ids of a text-only conversation, with the generation prompt added.

    The conversation is rendered as text first, so that a prompt over `max_prompt_chars` is refused
    before it is tokenized (the tokenizing render must sanitize control tokens, so it cannot reuse that text).
    """

    def render() -> list[int]:
        _rendered_text(tokenizer, template, messages, tools=tools, template_kwargs=template_kwargs, limits=limits)
        ids = tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
            **template_kwargs,
        )
        return [int(token_id) for token_id in ids]

    return await _run_bounded(render, limits)


async def render_text(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
    limits: RequestLimits,
) -> str:
    """The rendered prompt text (for processors that expand image placeholders themselves).

    Refused when longer than `max_prompt_chars`.
    """
    render = functools.partial(
        _rendered_text, tokenizer, template, messages, tools=tools, template_kwargs=template_kwargs, limits=limits
    )
    return await _run_bounded(render, limits)


async def render_with_processor(
    processor: Any,
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
    limits: RequestLimits,
) -> dict[str, Any]:
    """Render, tokenize and process a conversation whose image parts hold their images (`"image"` keys).

    The processor expands image placeholders and computes pixel tensors; control tokens and image
    placeholders typed in caller text stay plain text. Returns the processor's outputs (input_ids [1, L], ...).
    """

    def render_once(sanitize: bool) -> dict[str, Any]:
        outputs = processor.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=sanitize,
            processor_kwargs={"add_special_tokens": False},
            **template_kwargs,
        )
        return dict(outputs)

    def render() -> dict[str, Any]:
        try:
            return render_once(sanitize=True)
        except ValueError as error:
            # Some processors (Idefics3's) need character offsets that a sanitizing tokenizer does not
            # give. Without sanitizing, control tokens in caller text would be read as real ones, so
            # that is allowed only when no caller text holds any.
            if "char_to_token" not in str(error):
                raise
            forged = control_tokens_in(processor.tokenizer, [messages, tools, template_kwargs])
            if forged:
                raise InvalidRequestError(
                    f"the conversation contains the model's control token {forged!r}, which this model's "
                    "processor cannot keep as plain text; remove it"
                ) from None
            return render_once(sanitize=False)

    return await _run_bounded(render, limits)


def control_tokens_in(tokenizer: Any, caller_data: list[Any]) -> str | None:
    """The first special or added token string that appears anywhere in the caller's data, or None."""
    text = json.dumps(caller_data, ensure_ascii=False, default=lambda value: "")
    tokens = {*getattr(tokenizer, "all_special_tokens", []), *tokenizer.get_added_vocab()}
    return next((token for token in sorted(tokens, key=len, reverse=True) if token and token in text), None)


async def generation_prompt_suffix(
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any],
    limits: RequestLimits,
) -> str | None:
    """The text the generation prompt adds after the conversation, such as `<|im_start|>assistant` and
    a newline, then `<think>` for templates that open a reasoning section there.

    Whether the model's output starts inside a reasoning section is read from this text only: the
    conversation's own text (a user message or tool result that ends with `<think>`) must not open one.
    It is the conversation rendered with the generation prompt minus the same conversation rendered
    without it. Rendering text is cheap next to tokenizing it (under a millisecond for a 300,000-character
    conversation), so both renderings run, for reasoning models only, in one worker-thread call.

    None when it cannot be told: the rendering without the generation prompt is not a prefix of the
    one with it (a template that renders earlier turns differently), or that rendering fails or takes
    too long. The caller then falls back to decoding the prompt's last `REASONING_TAIL_TOKENS` tokens,
    which may include the end of the last message.
    """

    def render(add_generation_prompt: bool) -> str:
        return _template_text(
            tokenizer,
            template,
            messages,
            tools=tools,
            template_kwargs=template_kwargs,
            add_generation_prompt=add_generation_prompt,
        )

    def suffix() -> str | None:
        with_prompt, without_prompt = render(True), render(False)
        return with_prompt[len(without_prompt) :] if with_prompt.startswith(without_prompt) else None

    try:
        return await asyncio.wait_for(asyncio.to_thread(suffix), timeout=limits.chat_template_timeout_s)
    except (TimeoutError, jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None

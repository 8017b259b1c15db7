"""Chat with a model through its own chat template (GGUF `tokenizer.chat_template`), on the C++ runtime.

The template is the checkpoint's Jinja source, rendered as Hugging Face's apply_chat_template does (a
sandboxed environment, trim_blocks/lstrip_blocks, `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception`). Each turn renders the whole conversation and evaluates it from an empty
cache, so what the model sees is exactly what the template says; when the conversation no longer fits the
context, the oldest turns (after a system message) are dropped. numpy, jinja2 and the native library only.
"""
from __future__ import annotations

from collections.abc import Callable

from .native import Context, Model


class ChatError(ValueError):
    """The model cannot chat (no template) or the template failed."""


def render(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    """The conversation as the template writes it."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ChatError(f"chat template: {msg}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise ChatError(f"chat template does not render: {e}") from None


class ChatSession:
    """A conversation with `model`: reply(text) appends the user's turn, generates the assistant's."""

    def __init__(self, model: Model, system: str | None = None, n_threads: int = 0, max_new_tokens: int = 256,
                 **sampling):
        template = model.chat_template()
        if not template:
            raise ChatError("this model file has no chat template (tokenizer.chat_template); convert a checkpoint "
                            "whose tokenizer_config.json or chat_template.jinja has one, or use plain `run -p`")
        self.model, self.template, self.sampling = model, template, sampling
        self.max_new_tokens = max_new_tokens
        self.n_ctx = model.info["n_ctx_train"]
        self.bos = model.token_to_piece(model.bos_id, special=True).decode("utf-8", "replace") \
            if model.bos_id is not None else ""
        self.eos = model.token_to_piece(model.eos_id, special=True).decode("utf-8", "replace") \
            if model.eos_id is not None else ""
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.ctx = Context(model, n_ctx=self.n_ctx, n_threads=n_threads)

    def _prompt_tokens(self):
        while True:
            text = render(self.template, self.messages, self.bos, self.eos)
            tokens = self.model.tokenize(text, add_bos=False)
            if len(tokens) + self.max_new_tokens <= self.n_ctx:
                return tokens
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                raise ChatError(f"the message is {len(tokens)} tokens; with {self.max_new_tokens} new tokens it "
                                f"does not fit the model's context of {self.n_ctx}")
            del self.messages[first:first + 2]   # the oldest exchange

    def reply(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        self.messages.append({"role": "user", "content": text})
        try:
            tokens = self._prompt_tokens()
        except ChatError:
            self.messages.pop()
            raise
        self.ctx.reset()
        pending = bytearray()

        def cb(tok: int):
            pending.extend(self.model.token_to_piece(tok))
            try:
                s = pending.decode("utf-8")
            except UnicodeDecodeError:
                if len(pending) < 4:
                    return False
                s = pending.decode("utf-8", "replace")
            pending.clear()
            if stream:
                stream(s)
            return False
        new = self.ctx.generate(tokens, self.max_new_tokens, callback=cb, **self.sampling)
        if pending and stream:
            stream(pending.decode("utf-8", "replace"))
        answer = self.model.detokenize(new).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def close(self) -> None:
        self.ctx.close()

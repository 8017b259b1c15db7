"""Chat with a model through its own chat template (GGUF `tokenizer.chat_template`), on the C++ runtime.

The template is the checkpoint's Jinja source, rendered as Hugging Face's apply_chat_template does (a
sandboxed environment, trim_blocks/lstrip_blocks, `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception`). Each turn renders the whole conversation and evaluates it from an empty
cache prefix it shares with the previous turn (the KV cache is rewound to the first token that differs, so
only the new turn is evaluated), and what the model sees is exactly what the template says; when the
conversation no longer fits the context, the oldest turns (after a system message) are dropped.

A reply ends at EOS or at the template's own end-of-turn marker (`<|eot_id|>`, `<|im_end|>`, `<|end|>`,
`<end_of_turn>`, ...: the known markers that the template source writes), as llama.cpp's end-of-generation
tokens do. A marker that is one special token stops on that token; any other marker stops when the text
ends with it (streamed text holds back what may be the start of a marker). numpy, jinja2 and the native
library only.
"""
from __future__ import annotations

from collections.abc import Callable

from wqedge.runtime.native import Context, Model


# End-of-turn markers of the LLaMA-family chat templates (Llama 3, ChatML, Phi-3, Gemma, Llama 3.1 tools, ...).
END_OF_TURN_MARKERS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                       "<|end_of_text|>", "</s>")


def end_of_turn_markers(template: str, eos: str = "") -> tuple[str, ...]:
    """The markers a reply stops at: EOS's text and each known marker the template source itself writes."""
    found = [m for m in END_OF_TURN_MARKERS if m in template]
    return tuple(dict.fromkeys(([eos] if eos else []) + found))


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


# The conversation's context when none is asked for: the model's own length, at most this many tokens (as the C API's
# default context and llama.cpp's). The KV cache is allocated for the whole context up front, and a model trained on
# long contexts would otherwise take gigabytes for a chat (Llama 3.1 8B at 131072 tokens: 17 GB with the fp16 cache).
DEFAULT_CHAT_CTX = 4096


class ChatSession:
    """A conversation with `model`: reply(text) appends the user's turn, generates the assistant's. n_ctx: the
    conversation's context in tokens (0: min(the model's, DEFAULT_CHAT_CTX)); the oldest exchanges are dropped
    when a turn would not fit it."""

    def __init__(self, model: Model, system: str | None = None, n_threads: int = 0, max_new_tokens: int = 256,
                 stop: tuple[str, ...] | None = None, kv_bits: str | int | None = None, kv_rotation: str | None = None,
                 n_ctx: int = 0, **sampling):
        template = model.chat_template()
        if not template:
            raise ChatError("this model file has no chat template (tokenizer.chat_template); convert a checkpoint "
                            "whose tokenizer_config.json or chat_template.jinja has one, or use plain `run -p`")
        self.model, self.template, self.sampling = model, template, sampling
        self.max_new_tokens = max_new_tokens
        train = int(model.info["n_ctx_train"])
        if n_ctx < 0 or n_ctx > train:
            raise ChatError(f"a context of {n_ctx} tokens: use 1 to the model's context length {train} (0 = "
                            f"{min(train, DEFAULT_CHAT_CTX)})")
        self.n_ctx = n_ctx or min(train, DEFAULT_CHAT_CTX)
        self.bos = model.token_to_piece(model.bos_id, special=True).decode("utf-8", "replace") \
            if model.bos_id is not None else ""
        self.eos = model.token_to_piece(model.eos_id, special=True).decode("utf-8", "replace") \
            if model.eos_id is not None else ""
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.ctx = Context(model, n_ctx=self.n_ctx, n_threads=n_threads, kv_bits=kv_bits, kv_rotation=kv_rotation)
        self.stop_text = tuple(stop) if stop is not None else end_of_turn_markers(template, self.eos)
        self.stop_ids = {model.eos_id} if model.eos_id is not None else set()
        for marker in self.stop_text:   # a marker that is one special token stops on the token itself
            ids = model.tokenize(marker, add_bos=False)
            if len(ids) == 1 and model.token_to_piece(int(ids[0]), special=True).decode("utf-8", "replace") == marker:
                self.stop_ids.add(int(ids[0]))
        self.cached: list[int] = []     # the tokens whose keys and values are in the cache, in order
        self.reused = 0                 # cache tokens the last reply did not evaluate again

    def _prompt_tokens(self):
        while True:
            text = render(self.template, self.messages, self.bos, self.eos)
            tokens = self.model.tokenize(text, add_bos=False)
            if len(tokens) + self.max_new_tokens <= self.n_ctx:
                return tokens
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                raise ChatError(f"the message is {len(tokens)} tokens; with {self.max_new_tokens} new tokens it "
                                f"does not fit the conversation's context of {self.n_ctx} tokens")
            del self.messages[first:first + 2]   # the oldest exchange

    def _rewind(self, tokens: list[int]) -> list[int]:
        """Keep the cache prefix shared with `tokens` (at least one token is left to evaluate, for logits);
        the tokens still to evaluate."""
        n = 0
        limit = min(len(self.cached), len(tokens) - 1, self.ctx.position)
        while n < limit and self.cached[n] == tokens[n]:
            n += 1
        self.ctx.set_position(n)
        self.reused = n
        return tokens[n:]

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` may be the start of a stop marker."""
        for k in range(min(len(text), max((len(m) for m in self.stop_text), default=1) - 1), 0, -1):
            if any(m.startswith(text[-k:]) for m in self.stop_text):
                return k
        return 0

    def reply(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        self.messages.append({"role": "user", "content": text})
        try:
            tokens = [int(t) for t in self._prompt_tokens()]
        except ChatError:
            self.messages.pop()
            raise
        rest = self._rewind(tokens)
        pending = bytearray()
        state = {"text": "", "sent": 0, "done": False}

        def emit(upto: int):
            if stream and upto > state["sent"]:
                stream(state["text"][state["sent"]:upto])
            state["sent"] = max(state["sent"], upto)

        def cb(tok: int):
            if tok in self.stop_ids:
                return True
            pending.extend(self.model.token_to_piece(tok))
            try:
                piece = pending.decode("utf-8")
            except UnicodeDecodeError:
                if len(pending) < 4:
                    return False
                piece = pending.decode("utf-8", "replace")
            pending.clear()
            state["text"] += piece
            for m in self.stop_text:
                i = state["text"].find(m)
                if i >= 0:
                    state["text"] = state["text"][:i]
                    state["done"] = True
            if state["done"]:
                emit(len(state["text"]))
                return True
            emit(len(state["text"]) - self._held_back(state["text"]))
            return False
        new = self.ctx.generate(rest, self.max_new_tokens, callback=cb, **self.sampling)
        if pending and not state["done"]:
            state["text"] += pending.decode("utf-8", "replace")
        emit(len(state["text"]))
        self.cached = (tokens + new)[: self.ctx.position]
        answer = state["text"].strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def close(self) -> None:
        self.ctx.close()

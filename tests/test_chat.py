"""`wqedge run --chat` (issue 13): the checkpoint's chat template travels in the GGUF, is rendered exactly as
Hugging Face's apply_chat_template renders it, and drives a conversation on the C++ runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from wqedge.cli import main
from wqedge.runtime import native
from wqedge.runtime.chat import ChatError, ChatSession, render


@pytest.fixture(scope="module")
def chat_files(tiny_model_factory, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("chat")
    for kind, model in (("spm", tiny_model_factory(seed=7)), ("bpe", tiny_model_factory(bpe=True))):
        f = root / f"{kind}.gguf"
        res = CliRunner().invoke(main, ["convert", str(model), "-o", str(f), "--preset", "q8", "--no-check", "--no-self-calib"])
        assert res.exit_code == 0, res.output
        out[kind] = (model, f)
    return out


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, who are you?"},
            {"role": "assistant", "content": "A tiny model."}, {"role": "user", "content": "Prove it: 2+2?"}]


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_template_renders_and_tokenizes_as_hugging_face(chat_files, kind):
    from transformers import AutoTokenizer
    model_dir, f = chat_files[kind]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    want = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    with native.Model(f) as m:
        tpl = m.chat_template()
        assert tpl == tok.chat_template
        bos = m.token_to_piece(m.bos_id, special=True).decode() if m.bos_id is not None else ""
        eos = m.token_to_piece(m.eos_id, special=True).decode() if m.eos_id is not None else ""
        got = render(tpl, MESSAGES, bos, eos)
        assert got == want
        assert list(m.tokenize(got, add_bos=False)) == tok(want, add_special_tokens=False)["input_ids"]


def test_chat_command_answers_each_line(chat_files):
    _, f = chat_files["spm"]
    res = CliRunner().invoke(main, ["run", str(f), "--chat", "-n", "6", "--system", "Be brief."],
                             input="hello\n\nhow are you\n")
    assert res.exit_code == 0, res.output
    # Two answers, the empty line skipped: the output is exactly the two replies of a session fed the same lines
    # (greedy, the CLI default), each followed by a newline (a reply may itself contain newlines).
    with native.Model(f) as m:
        s = ChatSession(m, system="Be brief.", max_new_tokens=6, temperature=0.0, seed=0)
        pieces = []
        for line in ("hello", "how are you"):
            s.reply(line, stream=pieces.append)
            pieces.append("\n")
        want = "".join(pieces)
        s.close()
    assert res.output == want


def test_session_keeps_the_conversation_and_drops_old_turns_when_full(chat_files):
    _, f = chat_files["spm"]
    with native.Model(f) as m:
        s = ChatSession(m, system="Be brief.", max_new_tokens=4, seed=1)
        s.reply("first question")
        s.reply("second question")
        assert [x["role"] for x in s.messages] == ["system", "user", "assistant", "user", "assistant"]
        s.n_ctx = len(m.tokenize(render(s.template, s.messages[:1] + s.messages[3:], s.bos, s.eos))) + 30
        s.reply("third")       # does not fit with the first exchange: it is dropped, the system message kept
        assert s.messages[0]["role"] == "system" and s.messages[1]["content"] != "first question"
        with pytest.raises(ChatError, match="does not fit"):
            s.reply("word " * 400)
        s.close()


def test_model_without_template_is_a_clear_error(tiny_model_factory, copy_model, tmp_path):
    d = copy_model(tiny_model_factory(seed=8))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (d / extra).unlink(missing_ok=True)
    f = tmp_path / "m.gguf"
    assert CliRunner().invoke(main, ["convert", str(d), "-o", str(f), "--preset", "q8", "--no-check", "--no-self-calib"]).exit_code == 0
    res = CliRunner().invoke(main, ["run", str(f), "--chat"], input="hi\n")
    assert res.exit_code == 1 and "no chat template" in res.output


@pytest.mark.parametrize("act", ["f32", "q8"])
def test_run_act_option_selects_the_decode_path(chat_files, act):
    _, f = chat_files["spm"]
    code = (f"import sys; from wqedge.cli import main; from wqedge.runtime import native\n"
            f"try:\n    main(['run', {str(f)!r}, '-p', 'hello', '-n', '3', '--act', '{act}'])\n"
            f"except SystemExit as e:\n    print('ACT=' + native.get_activations()); sys.exit(e.code)\n")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and f"ACT={act}" in r.stdout, r.stdout + r.stderr


def test_stop_markers_come_from_the_template():
    from wqedge.runtime.chat import end_of_turn_markers
    from wqedge.tinymodel import BPE_CHAT_TEMPLATE, SPM_CHAT_TEMPLATE
    assert end_of_turn_markers(BPE_CHAT_TEMPLATE, "<|end_of_text|>") == ("<|end_of_text|>", "<|end|>")
    assert end_of_turn_markers(SPM_CHAT_TEMPLATE, "</s>") == ("</s>",)
    llama3 = "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    assert end_of_turn_markers(llama3, "<|end_of_text|>") == ("<|end_of_text|>", "<|eot_id|>")


def test_special_token_marker_stops_on_its_id_and_text_markers_on_text(chat_files):
    _, f = chat_files["bpe"]
    with native.Model(f) as m:
        s = ChatSession(m, max_new_tokens=4)
        # <|end_of_text|> is one special token (EOS) of the tiny BPE vocab; <|end|> is plain text there
        assert m.eos_id in s.stop_ids and len(s.stop_ids) == 1
        assert "<|end|>" in s.stop_text
        s.close()


def test_reply_stops_at_a_text_marker_and_streams_exactly_the_answer(chat_files):
    _, f = chat_files["spm"]
    with native.Model(f) as m:
        free = ChatSession(m, max_new_tokens=12, stop=())   # greedy, no marker: the unconstrained answer
        full = free.reply("hello there")
        free.close()
        words = full.split()
        assert len(words) >= 3, full
        marker = words[2]                                   # stop where the third word starts
        s = ChatSession(m, max_new_tokens=12, stop=(marker,))
        streamed = []
        answer = s.reply("hello there", stream=streamed.append)
        s.close()
    cut = full[: full.index(marker)].strip()
    assert answer == cut
    assert "".join(streamed).strip() == cut and marker not in "".join(streamed)


def test_next_turn_reuses_the_cache_and_sees_the_same_logits(chat_files):
    _, f = chat_files["spm"]
    prev = native.get_activations()
    native.set_activations("f32")
    try:
        with native.Model(f) as m:
            s = ChatSession(m, system="Be brief.", max_new_tokens=6)
            s.reply("first question")
            s.messages.append({"role": "user", "content": "second question"})
            tokens = [int(t) for t in s._prompt_tokens()]
            rest = s._rewind(tokens)
            assert s.reused > 0 and len(rest) == len(tokens) - s.reused
            got = s.ctx.eval(rest)
            fresh = native.Context(m, n_ctx=s.n_ctx)
            want = fresh.eval(tokens)
            fresh.close()
            s.close()
    finally:
        native.set_activations(prev)
    # the cache prefix was written token by token (decode), the fresh one as a batch (prefill): float
    # summation order differs, nothing else
    assert np.abs(got - want).max() <= 1e-3 * want.std()


def test_context_is_bounded_and_settable(chat_files):
    """The conversation's context: min(the model's, DEFAULT_CHAT_CTX) by default (the KV cache is allocated for all of
    it up front), the asked size otherwise (its cache sized to it), more than the model's refused; `run --ctx`
    passes it (with --chat only)."""
    from wqedge.runtime.chat import DEFAULT_CHAT_CTX
    _, f = chat_files["spm"]
    with native.Model(f) as m:
        train = int(m.info["n_ctx_train"])
        s = ChatSession(m, max_new_tokens=4)
        assert s.n_ctx == s.ctx.n_ctx == min(train, DEFAULT_CHAT_CTX)
        s.close()
        s = ChatSession(m, max_new_tokens=4, n_ctx=48)
        assert s.n_ctx == s.ctx.n_ctx == 48
        with pytest.raises(ChatError, match="does not fit the conversation's context of 48 tokens"):
            s.reply("word " * 60)
        s.close()
        with pytest.raises(ChatError, match=f"model's context length {train}"):
            ChatSession(m, n_ctx=train + 1)
    res = CliRunner().invoke(main, ["run", str(f), "--chat", "-n", "4", "--ctx", "40"], input="word " * 50 + "\n")
    assert "error: " in res.output and "context of 40 tokens" in res.output, res.output   # reported, chat goes on
    res = CliRunner().invoke(main, ["run", str(f), "--chat", "-n", "4", "--ctx", "200"], input="hello\n")
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["run", str(f), "--ctx", "64"])
    assert res.exit_code != 0 and "--ctx is an option of --chat" in res.output

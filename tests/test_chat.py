"""`wqedge run --chat` (issue 13): the checkpoint's chat template travels in the GGUF, is rendered exactly as
Hugging Face's apply_chat_template renders it, and drives a conversation on the C++ runtime."""
from __future__ import annotations

import json

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
        res = CliRunner().invoke(main, ["convert", str(model), "-o", str(f), "--preset", "q8", "--no-check"])
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
    assert len([x for x in res.output.splitlines()]) == 2   # two answers, the empty line skipped


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
    assert CliRunner().invoke(main, ["convert", str(d), "-o", str(f), "--preset", "q8", "--no-check"]).exit_code == 0
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

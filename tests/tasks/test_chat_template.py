"""Chat templates: a checkpoint's tokenizer_config.json template is applied to message prompts through
transformers, and the ids are plain token ids (not the keys of a BatchEncoding, which transformers 5 returns
by default) that decode back to the rendered text.

    pytest -q tests/tasks/test_chat_template.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minirl_async.tasks.base import Prompt
from minirl_async.tasks.tokenizer import Tokenizer, build_char_tokenizer

pytest.importorskip("transformers")

TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
)


def test_message_prompt_goes_through_the_checkpoint_chat_template(tmp_path: Path) -> None:
    char = build_char_tokenizer()
    char.chat_template = TEMPLATE
    char.save(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)  # the loading path of real checkpoints
    assert tok.chat_template == TEMPLATE
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "12+3="}]
    ids = tok.encode_prompt(Prompt(text="12+3=", messages=messages))
    assert all(isinstance(i, int) for i in ids)
    rendered = "<bos>system:add\n<bos>user:12+3=\n<bos>assistant:"
    assert tok.decode(ids, skip_special_tokens=False) == rendered
    assert ids == [tok.bos_id] + char.encode("system:add\n") + [tok.bos_id] + char.encode("user:12+3=\n") \
        + [tok.bos_id] + char.encode("assistant:")
    # A prompt without messages keeps the plain [bos] + text encoding.
    assert tok.encode_prompt(Prompt(text="12+3=")) == [tok.bos_id] + char.encode("12+3=")


@pytest.mark.parametrize("where", ["jinja", "json"])
def test_template_in_its_own_file_is_found(tmp_path: Path, where: str) -> None:
    # transformers >= 4.43 saves the template as chat_template.jinja (older: chat_template.json or
    # tokenizer_config.json); a template missed there would silently train on the plain prompt format
    import json

    char = build_char_tokenizer()
    char.save(tmp_path)   # no template in tokenizer_config.json
    if where == "jinja":
        (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    else:
        (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.chat_template == TEMPLATE
    ids = tok.encode_prompt(Prompt(text="1+1=", messages=[{"role": "user", "content": "1+1="}]))
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>user:1+1=\n<bos>assistant:"

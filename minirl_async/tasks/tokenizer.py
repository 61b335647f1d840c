"""Tokenizer handling: a tiny character-level tokenizer for the synthetic tasks, and the same loading path
for real checkpoints (which bring their own `tokenizer.json`; chat templates through transformers when the
`hf` extra is installed and the checkpoint has one).

The tiny tokenizer is a `tokenizers` WordLevel model over single characters (printable ASCII and newline)
with special tokens <pad>=0, <bos>=1, <eos>=2, <unk>=3. A prompt is `[bos] + chars`; a response is
`chars + [eos]` (eos ends a response). It is saved as `tokenizer.json` (+ `tokenizer_config.json` naming the
special tokens) beside the model, and loaded back with `tokenizers.Tokenizer.from_file`, as any checkpoint's.

    tok = build_char_tokenizer(); tok.save("runs/tiny/sft")
    tok = Tokenizer.from_folder("runs/tiny/sft"); tok.encode("12+3="); tok.decode([...]); tok.eos_id
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from minirl_async.config import Config
from minirl_async.tasks.base import Prompt

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space and newline


def build_char_tokenizer() -> Tokenizer:
    """The character-level tokenizer of the synthetic tasks (vocab: 4 specials + 96 characters)."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK] + CHARS)}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; Fuse joins them back without the spaces WordLevel would insert.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([PAD, BOS, EOS, UNK])
    return Tokenizer(tk, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):  # tokenizer_config.json may store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and (optional) chat template of its checkpoint."""

    def __init__(self, tk: tokenizers.Tokenizer, bos_token: str | None, eos_token: str, pad_token: str | None,
                 chat_template: str | None = None, folder: str | None = None):
        self.tk, self.folder, self.chat_template = tk, folder, chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        eos_id = tk.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no eos token {eos_token!r}; set eos_token in tokenizer_config.json")
        self.eos_id: int = eos_id
        self.bos_id: int | None = tk.token_to_id(bos_token) if bos_token else None
        pad_id = tk.token_to_id(pad_token) if pad_token else None
        # Checkpoints without a pad token pad with eos (padding is always masked out anyway).
        self.pad_id: int = pad_id if pad_id is not None else self.eos_id
        self._hf: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self.tk.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without special tokens."""
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Prompt ids the policy sees: the chat template when the prompt has messages and the checkpoint a
        template (transformers), else `[bos] + text`."""
        if prompt.messages and self.chat_template:
            hf = self._hf_tokenizer()
            if hf is None:
                raise ValueError("prompts with chat `messages` and a checkpoint chat template need transformers "
                                 "to render it: pip install 'minirl-async[hf]'")
            # transformers 5 returns a BatchEncoding by default (list() of it would be its keys);
            # return_dict=False asks for plain ids in 4.x and 5.x, the Mapping branch is a second guard.
            out = hf.apply_chat_template(prompt.messages, tokenize=True, add_generation_prompt=True,
                                         return_dict=False, chat_template=self.chat_template)
            if isinstance(out, Mapping):
                out = out["input_ids"]
            ids = out.tolist() if hasattr(out, "tolist") else list(out)
            if ids and isinstance(ids[0], list):  # a batch of one conversation
                (ids,) = ids
            return [int(i) for i in ids]
        ids = self.encode(prompt.text)
        return [self.bos_id] + ids if self.bos_id is not None else ids

    def encode_response(self, text: str) -> list[int]:
        """Response ids of a target (SFT): the characters then eos."""
        return self.encode(text) + [self.eos_id]

    def _hf_tokenizer(self) -> Any:
        if self._hf is None and self.folder:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                return None
            self._hf = AutoTokenizer.from_pretrained(self.folder)
        return self._hf

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (special token names) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(folder / "tokenizer.json"))
        conf: dict[str, Any] = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                                "pad_token": self.tk.id_to_token(self.pad_id), "unk_token": UNK,
                                "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(conf, indent=1))

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load `path/tokenizer.json` (or `path` itself if it is the file) and its tokenizer_config.json."""
        path = Path(path)
        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"no tokenizer.json at {str(path)!r}; set data.tokenizer_path or save one with the model")
        tk = tokenizers.Tokenizer.from_file(str(file))
        conf: dict[str, Any] = {}
        if (file.parent / "tokenizer_config.json").is_file():
            conf = json.loads((file.parent / "tokenizer_config.json").read_text())
        eos = _token_name(conf.get("eos_token")) or EOS
        if tk.token_to_id(eos) is None and (file.parent / "config.json").is_file():
            eos_id = json.loads((file.parent / "config.json").read_text()).get("eos_token_id")
            if isinstance(eos_id, list):
                eos_id = eos_id[0]
            eos = (tk.id_to_token(eos_id) if isinstance(eos_id, int) else None) or eos
        bos = _token_name(conf.get("bos_token"))
        if "bos_token" not in conf and tk.token_to_id(BOS) is not None:
            bos = BOS
        pad = _token_name(conf.get("pad_token")) or (PAD if tk.token_to_id(PAD) is not None else None)
        return cls(tk, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=_chat_template(file.parent, conf),
                   folder=str(file.parent))


def _chat_template(folder: Path, conf: dict[str, Any]) -> str | None:
    """The folder's chat template wherever transformers put it: `chat_template.jinja` (transformers >= 4.43
    saves it there), `chat_template.json`, or the `chat_template` of tokenizer_config.json (older saves)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        tpl = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    tpl = conf.get("chat_template")
    return tpl if isinstance(tpl, str) else None


def load_tokenizer(cfg: Config, checkpoint: str | Path | None = None) -> Tokenizer:
    """`data.tokenizer_path` if set, else the checkpoint's tokenizer.json (checkpoint or `model.path`), else
    the built-in character tokenizer of the synthetic tasks."""
    if cfg.data.tokenizer_path:
        return Tokenizer.from_folder(cfg.data.tokenizer_path)
    folder = checkpoint or cfg.model.path or None
    if folder and (Path(folder) / "tokenizer.json").is_file():
        return Tokenizer.from_folder(folder)
    if cfg.data.task == "jsonl" and folder:
        raise ValueError(f"checkpoint {str(folder)!r} has no tokenizer.json; set data.tokenizer_path")
    return build_char_tokenizer()

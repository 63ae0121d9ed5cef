"""Tokenizers of the ground-truth generator: a small deterministic BPE trained on a built-in corpus, and its
extension / renumbering for an upgrade.

``make_tokenizer`` trains a GPT-2 style byte-level BPE or a SentencePiece-like metaspace BPE on a fixed
English corpus.  ``upgrade_tokenizer`` writes the upgraded tokenizer: ``extra`` new token strings (new BPE
merges ``a + b`` of word-like tokens, appended with the lowest merge priority, or added tokens) and the ids
renamed by ``perm`` (``perm[i]`` = new id of token ``i``), special-token ids in the post-processor included.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = ["make_tokenizer", "upgrade_tokenizer"]

_HANDWRITTEN = """\
The quick brown fox jumps over the lazy dog.
A small model can learn a lot from a little data.
She opened the window and the cold air came into the room.
We walked to the market on Monday and bought apples, bread and milk.
The train leaves at 7:45 in the morning and arrives at 10:30.
He wrote 3 letters, 12 emails and 250 words of his new story.
In 1999 the company had 40 workers; in 2024 it had more than 3000.
Please read the first chapter before the next class.
The answer to the question is not as simple as it looks.
They said that the weather would be better tomorrow.
My brother plays the piano every evening after dinner.
Water boils at 100 degrees and freezes at 0 degrees.
The children were playing in the park until the sun went down.
Can you tell me where the nearest station is?
I think this is the best book I have read this year.
Our team finished the project two weeks early.
The price of the house went up by 15 percent in one year.
Learning a new language takes time, patience and practice.
The doctor asked him how long he had been feeling sick.
There are 7 days in a week and 12 months in a year.
It was a dark and stormy night, and the old house was quiet.
The city council will meet again on the 3rd of June.
If you mix blue and yellow, you get green.
Most people agree that good sleep is important for health.
The river runs from the mountains to the sea.
Every student must bring a pencil, a notebook and a calculator.
The meeting was moved from Tuesday to Thursday afternoon.
He turned off the light and went to bed early.
Some birds fly south for the winter and return in the spring.
The museum is open from 9 to 5, except on Sundays.
She found an old photo of her grandmother in the attic.
We need 2 cups of flour, 1 cup of sugar and 3 eggs.
The computer program printed the numbers from 1 to 20.
After the rain stopped, a bright rainbow appeared over the hills.
Nobody knew why the bridge had been closed for so long.
The library has more than 50000 books and 300 computers.
My favorite color is blue, but my sister likes red.
The store sells fresh fruit, vegetables and fish.
They have lived in this small town for almost 30 years.
The plane landed safely despite the strong wind.
You should always check your work before you hand it in.
The first time I saw the ocean, I was 6 years old.
Good teachers make hard ideas easy to understand.
The little cat slept in a box near the warm fire.
A machine can process thousands of records per second.
The road to the village was long, narrow and full of holes.
He asked for a glass of water and a piece of cake.
The results of the test will be ready next week.
It is easier to start a habit than to break one.
The farmer grows corn, wheat and potatoes on his land.
At night the stars are bright and the streets are empty.
This recipe is simple, quick and very good.
The number 42 appears in many stories and jokes.
She smiled, waved goodbye and closed the door behind her.
We counted 8 ducks, 5 geese and 1 swan on the lake.
The kids built a snowman with a carrot for a nose.
Money does not grow on trees, as my father used to say.
The new bridge is 1200 meters long and 45 meters high.
Reading every day helps you learn new words.
The sun rises in the east and sets in the west.
Please call me back when you have a minute.
The old man told us a story about the war.
Our house has 4 rooms, a small garden and a garage.
The game ended 3 to 2 after a very long match.
Most of the shops in the center close at 6 in the evening.
Light travels much faster than sound.
I forgot my keys at home, so I had to wait outside.
The company will hire 20 new engineers this year.
Her voice was soft, but everyone in the room could hear it.
The history of the city goes back more than 800 years.
"""

_SUBJECTS = [
    "the man", "the woman", "my friend", "our teacher", "the little girl", "a young boy", "the old dog",
    "the team", "my mother", "his father", "the student", "a farmer", "the doctor", "the children",
    "every worker", "the small bird", "her sister", "the new manager", "the driver", "your neighbor",
]
_VERBS = [
    "saw", "found", "bought", "made", "wanted", "liked", "opened", "moved", "cleaned", "painted",
    "read", "wrote", "carried", "washed", "lost", "needed", "sold", "took", "gave away", "brought",
]
_OBJECTS = [
    "a red car", "the green door", "an old book", "some fresh bread", "the big house", "a long letter",
    "the heavy box", "three apples", "a small table", "the blue chair", "a warm coat", "the white cup",
    "two new shoes", "a picture of the sea", "the last train ticket", "a bag of rice", "the black hat",
    "a cold drink", "the broken clock", "a bright lamp",
]
_PLACES = [
    "in the kitchen", "at the station", "near the river", "in the garden", "at school", "in the city",
    "on the hill", "at the market", "in the office", "by the window", "at home", "in the park",
]
_TIMES = [
    "yesterday", "last night", "this morning", "on Sunday", "after lunch", "before dinner", "today",
    "last week", "in the evening", "at noon", "every day", "on Friday",
]


def _corpus() -> list[str]:
    """A deterministic English corpus (handwritten sentences + templated ones with numbers)."""
    lines = [ln for ln in _HANDWRITTEN.splitlines() if ln.strip()]
    rng = random.Random(20240601)
    for i in range(320):
        s = rng.choice(_SUBJECTS)
        v = rng.choice(_VERBS)
        o = rng.choice(_OBJECTS)
        kind = i % 4
        if kind == 0:
            line = f"{s.capitalize()} {v} {o} {rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        elif kind == 1:
            line = f"{s.capitalize()} {v} {rng.randint(2, 99)} things and paid {rng.randint(1, 999)} dollars."
        elif kind == 2:
            line = f"On day {rng.randint(1, 31)} of month {rng.randint(1, 12)}, {s} {v} {o}."
        else:
            line = f"Why {s} {v} {o} {rng.choice(_PLACES)} is a question for {rng.choice(_SUBJECTS)}."
        lines.append(line)
    digits = " ".join(str(i) for i in range(0, 101))
    lines.append(digits)
    lines.append("0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 1000 2025")
    return lines


_STYLE_SPECIALS = {
    # style -> (special tokens in id order, role -> token)
    "byte_bpe": (
        ["<|endoftext|>", "<|pad|>"],
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    ),
    "metaspace": (
        ["<pad>", "<eos>", "<bos>", "<unk>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ),
}


def make_tokenizer(style: str, out_dir, extra_tokens: list[str] = ()) -> PreTrainedTokenizerFast:
    """Train a small deterministic BPE tokenizer on the built-in corpus and save it into ``out_dir``.

    ``style="byte_bpe"``: GPT-2 style byte-level BPE (tokens like ``"Ġthe"``), 512 tokens.
    ``style="metaspace"``: SentencePiece-like BPE with ``"▁"`` word prefix (tokens like ``"▁the"``),
    480 tokens.  ``extra_tokens`` are appended as (non-special) added tokens.
    """
    if style not in _STYLE_SPECIALS:
        raise ValueError(f"unknown tokenizer style {style!r}; expected 'byte_bpe' or 'metaspace'")
    specials, roles = _STYLE_SPECIALS[style]
    if style == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            min_frequency=2,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=480, min_frequency=2, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def _special_roles(tok) -> dict[str, str]:
    roles = {}
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        val = getattr(tok, role, None)
        if val is not None:
            roles[role] = str(val)
    return roles

def _new_token_strings(tj: dict, n: int, rng: random.Random) -> tuple[list[str], list[list[str]] | None]:
    """Pick ``n`` new token strings.  For a BPE model they are new merges ``a + b`` of existing word-like
    tokens (``a`` = optional word-start marker + ASCII letters, ``b`` = lowercase ASCII letters),
    appended with the lowest merge priority; otherwise new added tokens ``<|lorasuite_new_i|>``."""
    model = tj.get("model", {})
    added = {a["content"] for a in tj.get("added_tokens", [])}
    if model.get("type") == "BPE" and isinstance(model.get("vocab"), dict) and isinstance(model.get("merges"), list):
        vocab = model["vocab"]
        existing = set(vocab) | added

        def word_like(s: str) -> bool:
            core = s[1:] if s[:1] in ("Ġ", "▁") else s
            return core.isascii() and core.isalpha()

        firsts = sorted(s for s in vocab if s not in added and word_like(s))
        seconds = sorted(s for s in vocab if s not in added and s.isascii() and s.isalpha() and s.islower())
        if not firsts or not seconds:
            firsts = seconds = sorted(s for s in vocab if s not in added)
        strings, merges = [], []
        tries = 0
        while len(strings) < n:
            tries += 1
            if tries > 200000:
                raise ValueError(f"could not find {n} new BPE merges")
            a, b = rng.choice(firsts), rng.choice(seconds)
            s = a + b
            if s in existing:
                continue
            existing.add(s)
            strings.append(s)
            merges.append([a, b])
        return strings, merges
    strings = [f"<|lorasuite_new_{i}|>" for i in range(n)]
    return strings, None


def upgrade_tokenizer(old_dir: Path, new_dir: Path, n_rows_old: int, extra: int, perm: list[int],
                       rng: random.Random) -> list[str]:
    old_tok = AutoTokenizer.from_pretrained(old_dir)
    roles = _special_roles(old_tok)
    tj = json.loads((old_dir / "tokenizer.json").read_text(encoding="utf-8"))
    n_tok = len(old_tok)
    identity = perm == list(range(len(perm)))
    if not extra and identity:
        old_tok.save_pretrained(new_dir)
        return []
    if n_tok != n_rows_old:
        raise ValueError(f"extra_vocab / renumber_vocab need vocab_size == len(tokenizer); got {n_rows_old} "
                         f"embedding rows and {n_tok} tokens")
    model = tj["model"]
    if isinstance(model.get("vocab"), dict):
        # The `tokenizers` library re-assigns the ids of added tokens that are not in the model vocab
        # (consecutively after it), so ids could not be permuted: move every added token into the model
        # vocab first (the added-token matching then uses the model id, exactly like special tokens).
        vocab = model["vocab"]
        for a in tj.get("added_tokens", []):
            if vocab.setdefault(a["content"], a["id"]) != a["id"]:
                raise ValueError(f"added token {a['content']!r} has id {a['id']} but vocab id {vocab[a['content']]}")
        if sorted(vocab.values()) != list(range(n_tok)):
            raise ValueError("tokenizer ids are not contiguous 0..len(tokenizer)-1; cannot renumber / extend")
    elif not identity:
        raise ValueError(f"renumber_vocab is not supported for {model.get('type')} tokenizers")
    strings: list[str] = []
    if extra:
        strings, merges = _new_token_strings(tj, extra, rng)
        if merges is not None:
            vocab = tj["model"]["vocab"]
            m = tj["model"]["merges"]
            as_str = bool(m) and isinstance(m[0], str)
            for i, (s, mg) in enumerate(zip(strings, merges)):
                vocab[s] = n_tok + i
                m.append(" ".join(mg) if as_str else mg)
        else:
            for i, s in enumerate(strings):
                if isinstance(model.get("vocab"), dict):
                    model["vocab"][s] = n_tok + i
                tj["added_tokens"].append({"id": n_tok + i, "content": s, "single_word": False, "lstrip": False,
                                           "rstrip": False, "normalized": False, "special": False})
    if not identity:
        model["vocab"] = {s: perm[i] for s, i in model["vocab"].items()}
        for a in tj.get("added_tokens", []):
            a["id"] = perm[a["id"]]
        pp = tj.get("post_processor")
        if pp and "special_tokens" in json.dumps(pp):
            def fix(obj):
                if isinstance(obj, dict):
                    if "ids" in obj and isinstance(obj["ids"], list):
                        obj["ids"] = [perm[i] for i in obj["ids"]]
                    for v in obj.values():
                        fix(v)
                elif isinstance(obj, list):
                    for v in obj:
                        fix(v)
            fix(pp)
    new_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)), **roles)
    if len(new_tok) != n_tok + extra:
        raise RuntimeError(f"internal: new tokenizer has {len(new_tok)} tokens, expected {n_tok + extra}")
    new_tok.save_pretrained(new_dir)
    return strings

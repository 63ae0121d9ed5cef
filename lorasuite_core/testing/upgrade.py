"""Ground-truth generator: tiny random Hugging Face models and *function-preserving* upgrades of them.

This module is the independent ground truth for the exactness tests, the demo and the benchmark.  It
builds tiny random causal LMs of five families (``llama``, ``qwen2``, ``gemma3`` -- the text-only
``gemma3_text`` model --, ``gpt_neox`` and ``bloom``), "upgrades" them to a bigger / re-parameterised model that
computes exactly the same function, and records the correspondence (token ids, layers, heads,
neurons, residual basis) in ``lorasuite_upgrade.json``.  It depends only on torch, transformers,
tokenizers and safetensors, and imports nothing else from ``lorasuite_core``.

Notation
========
``h`` is the residual stream (a row vector of size ``d``; ``D`` after the upgrade).  A linear layer
``y = W x + b`` stores ``W`` as ``[out, in]``.  "Readers" are the linears that read a normalised
residual (``q/k/v_proj``, ``gate/up_proj``, ``query_key_value``, ``dense_h_to_4h``, ``lm_head``);
"writers" are the linears whose output is added to the residual (``o_proj``/``dense``,
``down_proj``/``dense_4h_to_h``, and the embedding).  Every upgrade step below maps the old residual
``h`` of *every* layer boundary to ``T h`` (``T`` is ``D x d``), so it is enough to show that each
block's contribution transforms the same way and that the readers see the same inputs.

Norms (exact formulas of transformers 5.x):
  * llama / qwen2 RMSNorm:  ``n(x) = w * x / sqrt(mean(x^2) + eps)``.
  * gemma3 RMSNorm:         ``n(x) = (1 + w) * x / sqrt(mean(x^2) + eps)`` (computed in float32).
    Internally we always work with the *effective* weight ``g = 1 + w`` (``g = w`` for the others).
  * gpt_neox / bloom LayerNorm: ``n(x) = w * (x - mean(x)) / sqrt(var(x) + eps) + b``.
gemma3 additionally multiplies the embedding by ``sqrt(hidden_size)``, normalises the *outputs* of the
attention and of the MLP (``post_attention_layernorm``, ``post_feedforward_layernorm``) before adding
them to the residual, and applies ``q_norm``/``k_norm`` (RMSNorm over ``head_dim``, sharing
``config.rms_norm_eps``) per head; its attention scale is ``query_pre_attn_scalar ** -0.5``.
gpt_neox fuses q, k, v in one linear whose output rows are laid out ``[head][q|k|v][head_size]``
(``qkv.view(..., num_heads, 3*head_size)`` then ``chunk(3)``), applies RoPE to the first
``partial_rotary_factor * head_size`` dims of each head, and (by default) uses a parallel residual
``h + attn(ln1(h)) + mlp(ln2(h))``.
bloom fuses q, k, v the same way (``[head][q|k|v][head_dim]``, all linears with biases), has no
rotary embedding but ALiBi: head ``h`` of ``H`` adds ``m_h * (j - i)`` to its scores, with slopes
``m_h`` that depend on ``h`` *and* on ``H`` (a geometric sequence from ``2^floor(log2 H)``); its
embedding goes through a LayerNorm (``word_embeddings_layernorm``) before the first layer, its MLP
is ``dense_4h_to_h(gelu(dense_h_to_4h x))`` of width exactly ``4 * hidden_size`` (no config field),
``head_dim = hidden_size / n_head``, and its residual is sequential (``apply_residual_connection_
post_layernorm`` false).  What that leaves function-preserving for bloom:
  * residual: only a *permutation* (as gpt_neox; the embedding LayerNorm's weight and bias are
    permuted with it, ``LN(P e) = P LN(e)`` for permuted weights).  A rotation fixing the all-ones
    direction would commute with the centring, but not with the embedding LayerNorm's element-wise
    weight, whose output *is* the residual (no linear follows it to fold the weight into); sign
    flips break the centring.  Widening is impossible twice over: LayerNorm centres over all ``D``
    dims (zero-padding changes mean and variance), and ``head_dim = D / H`` would change;
  * heads: nothing.  A permuted head meets another slope, an added head changes ``H`` and with it
    every slope (even with a zero ``dense`` column) and ``head_dim``; attention is multi-head, so
    there is no kv group to replicate;
  * MLP: permuting neurons is exact; adding neurons is not expressible (width ``4 * hidden_size``);
  * identity layers (ALiBi does not depend on the layer), vocabulary changes, folding the input
    norms into ``query_key_value`` / ``dense_h_to_4h`` (never the embedding LayerNorm: its output
    is the residual itself) -- all exact.
The unsupported kinds raise ``ValueError`` naming the reason (``_check_spec``).

The steps, applied in this order (each one is exactly function preserving, hence so is any
composition):

1. ``fold_norms`` -- fold the norm weight into its readers.  For a pre-norm followed by readers
   ``W_k``: ``W_k (g * x/rms) = (W_k diag(g)) (x/rms)``, so ``W_k <- W_k diag(g)`` and ``g <- 1``
   (gemma3: ``w <- 0``).  LayerNorm: ``W (w*n + b) = W diag(w) (n + b/w)``, so ``w <- 1``,
   ``b <- b / w``, ``W <- W diag(w)`` (requires ``w != 0``).  Folded: input norms (before q/k/v and
   before gate/up, or before ``query_key_value`` / ``dense_h_to_4h``) and the final norm into
   ``lm_head`` (only when ``lm_head`` is untied -- folding into a tied head would change the
   embedding).  Never folded: gemma3's post-attention/post-feedforward norms (their output goes into
   the residual, nothing linear follows) and ``q_norm``/``k_norm`` (RoPE follows them).
   ``rotate_residual`` on llama/qwen2 *implies* folding (see 5.), and then the final norm is folded
   into ``lm_head`` even when it was tied: the upgraded model is written untied.

2. Vocabulary.  ``extra_vocab``: append rows to the embedding and ``lm_head`` (they are never read
   by old token ids, and old logits are columns of ``lm_head`` rows that do not change).  The added
   tokens need logits of their own too, and greedy decoding over the whole new vocabulary must not
   pick them: by default (``added_token_logits="mean"``) their ``lm_head`` rows are the mean of the
   old rows, so each added logit is the mean of the old logits -- never above their maximum (a
   soft-cap is monotone) -- while the embedding rows are random (tied: the same mean rows).
   ``"random"`` draws random ``lm_head`` rows as well (the generator's first behaviour, kept to
   reproduce the benchmark's derived model): then only old-id logits are preserved, and on
   SmolLM2-135M with 1000 added tokens 33 of 48 greedy generations of an adapted model took an
   added token.
   ``renumber_vocab``: a permutation ``s`` of token ids; row ``i`` moves to row ``s(i)`` of both
   matrices, and the tokenizer's vocab ids (and special-token ids in the config) are renamed the
   same way.  The ground truth ``token_map`` is ``old id -> new id``.

3. MLP neurons.  ``down(act(gate x) * (up x))`` (gpt_neox: ``down(act(up x + b))``) is a sum over
   neurons, so permuting the rows of gate/up (and their biases) together with the columns of down
   changes nothing (``permute_neurons``), and a new neuron with a zero column in ``down`` adds
   ``0 * anything = 0`` (``extra_neurons``; its gate/up rows are random).

4. Attention heads (``head_dim`` is never changed and no dimension *within* a head is ever moved,
   so RoPE, ``q_norm``/``k_norm`` and the attention scale are untouched).  With ``G = H / KV`` query
   heads per kv group, query head ``j*G + p`` attends with kv head ``j``; the output is
   ``sum_heads O[:, head] softmax(q_head k_j^T) v_j``.
   * ``kv_replication = r``: every kv head ``j`` is copied to ``j*r .. j*r+r-1``; the new group size
     is ``G/r`` and query head ``j*G + p`` (unchanged index!) now belongs to new kv group
     ``j*r + p // (G/r)``, a copy of ``j``.  Requires ``G % r == 0``.
   * ``extra_query_heads_per_group = e``: every (new) kv group gets ``e`` new query heads with random
     ``q_proj`` rows and *zero* ``o_proj`` columns, so they contribute nothing.
   * ``permute_heads``: permute the kv groups (k/v rows and their biases) and, inside every group,
     its query heads (``q_proj`` rows + bias and ``o_proj`` columns); the sum over heads is
     unchanged.  For MHA (gpt_neox) this is a plain head permutation of the fused ``[q|k|v]`` blocks.
   qwen2's q/k/v biases live in head space, so they follow the head maps (and are untouched by the
   residual transforms of 5.).

5. Residual stream.  Here ``T = P c [I; 0]`` with ``c = sqrt(D/d)`` and ``P`` (``D x D``) orthogonal.
   * ``widen_residual = k`` (``D = d + k``; not for gpt_neox: LayerNorm subtracts the mean over all
     ``D`` dims, which zero-padding changes).  We scale the residual by ``c`` instead of touching
     ``eps``.  For ``h' = c [h; 0]``:
     ``mean_D(h'^2) + eps = c^2 |h|^2 / D + eps = |h|^2 / d + eps``, so ``rms_D(h') = rms_d(h)``
     *exactly, with the same eps* (rescaling eps by ``d/D`` instead would also change gemma3's
     ``q_norm``/``k_norm``, which share ``rms_norm_eps``).  Therefore
     - writers: ``W <- c [W; 0]``, ``b <- c [b; 0]``; embedding ``E <- c [E, 0]`` (gemma3: the
       embedding scale changes from ``sqrt(d)`` to ``sqrt(D)`` and ``c sqrt(d) / sqrt(D) = 1``, so
       ``E <- [E, 0]``);
     - a pre-norm sees ``c [h; 0] / rms_d(h)``: its weight becomes ``[g; r] / (c a)`` and its readers
       ``a [W, R]`` (``r``, ``R`` random: those inputs are always 0; ``a = 1``, except for a tied
       ``lm_head`` where ``a`` is the embedding factor so that ``lm_head == embedding`` still holds
       and ``R = 0``).  A folded norm keeps ``g = 1`` and its readers become ``[W / c, R]``;
     - gemma3 post-norms: their input is an ``o_proj``/``down_proj`` output, which is now
       ``c [y; 0]`` with ``rms_D = rms_d(y)``, and their output must be ``c [n(y); 0]``: the weight
       becomes ``[g; r]`` (no rescale).
   * ``rotate_residual``: ``h <- P h``.  Writers ``W <- P W``, ``b <- P b``, embedding ``E <- E P^T``,
     readers ``W <- W P^T``.  An element-wise norm weight commutes with ``P`` only if ``P`` is a
     (signed) permutation: for ``(P x)_i = s_i x_pi(i)``,
     ``(P x) * (|P| g) = P (x * g)`` and ``rms(P x) = rms(x)``.  So
     - llama / qwen2: ``P`` is a random orthogonal matrix; this needs every residual norm to have a
       scalar weight, so all of them are folded first (step 1, forced);
     - gemma3: ``P`` is a random *signed permutation* (the post-norms cannot be folded, so a general
       rotation is impossible); norm weights ``g <- |P| g``;
     - gpt_neox / bloom: ``P`` is a random *permutation* (LayerNorm's mean subtraction forbids sign
       flips); ``w <- P w``, ``b <- P b`` (bloom: for its embedding LayerNorm too).

6. ``identity_layers``: insert layers (at these indices of the *new* layer list) whose writers are
   zero (``o_proj``/``down_proj`` or ``dense``/``dense_4h_to_h``, weights *and* biases) and whose
   other weights are random: they add exactly 0 to the residual (gemma3's post-norm of 0 is 0).
   Their ``layer_types`` entry (sliding/full attention) is copied from the previous layer (the next
   one when inserted at position 0).

All arithmetic is done in float64 and the result is stored in float32, so the upgraded model agrees
with the original up to float32 rounding (relative max logit error ~1e-6).  Module names never
change (only shapes and counts), so an old PEFT adapter stays meaningful under ``layer_map``.

Ground truth files written next to the upgraded model:
  * ``lorasuite_upgrade.json``: ``token_map`` (old id -> new id), ``layer_map`` (old layer -> new
    layer), ``spec``, plus ``heads`` / ``kv_heads`` / ``neurons`` maps (per *old* layer: for every new
    index, the old index it came from or ``null`` for new units), dims, and flags.
  * ``lorasuite_upgrade.safetensors``: ``residual`` = ``T`` (``D x d``, float64) with
    ``h_new = T @ h_old`` at every layer boundary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = [
    "FAMILIES",
    "UpgradeSpec",
    "make_tokenizer",
    "make_tiny_model_dir",
    "upgrade_model_dir",
    "make_random_lora_adapter",
    "DEFAULT_LORA_TARGETS",
    "GROUND_TRUTH_FILE",
    "RESIDUAL_FILE",
]

FAMILIES = ("llama", "qwen2", "gemma3", "gpt_neox", "bloom")

GROUND_TRUTH_FILE = "lorasuite_upgrade.json"
RESIDUAL_FILE = "lorasuite_upgrade.safetensors"

_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text", "gpt_neox": "gpt_neox", "bloom": "bloom"}
_FAMILY_OF_MODEL_TYPE = {v: k for k, v in _MODEL_TYPE.items()}
_TOKENIZER_STYLE = {"llama": "byte_bpe", "qwen2": "byte_bpe", "gemma3": "metaspace", "gpt_neox": "byte_bpe",
                    "bloom": "byte_bpe"}
_FUSED_QKV = ("gpt_neox", "bloom")       # one query_key_value, rows [head][q|k|v][head_dim]
_LAYER_NORM = ("gpt_neox", "bloom")      # LayerNorm with bias (everything else: RMSNorm)
# config.json keys of the dims the upgrade changes (bloom writes n_layer / n_head and has no MLP width)
_CONFIG_KEYS = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "inter": "intermediate_size"}
_FAMILY_CONFIG_KEYS = {"bloom": {"layers": "n_layer", "heads": "n_head", "inter": None}}

DEFAULT_LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}

# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Canonical (family independent) float64 representation
# ----------------------------------------------------------------------------------------------
#
# canon = {
#   "family": str, "dims": {hidden, heads, kv_heads, head_dim, inter, vocab},
#   "embed": [V, d], "lm_head": {"w": [V, d], "b": None}, "tied": bool,
#   "final_norm": norm, "embed_norm": norm|None (bloom's word_embeddings_layernorm), "layers": [layer, ...]
# }
# norm  = {"w": effective weight g (gemma3: 1 + w), "b": LayerNorm bias or None, "folded": bool}
# layer = {"attn_norm": norm, "mlp_norm": norm, "post_attn_norm": norm|None, "post_ff_norm": norm|None,
#          "q_norm": norm|None, "k_norm": norm|None,
#          "q"/"k"/"v"/"o"/"up"/"down": {"w", "b"|None}, "gate": {"w", "b"}|None}
# gpt_neox's and bloom's fused query_key_value is split into q/k/v (and re-fused on save).

_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
_PRE_NORMS = ("attn_norm", "mlp_norm")
_POST_NORMS = ("post_attn_norm", "post_ff_norm")


def _gemma_like(family: str) -> bool:
    return family == "gemma3"


def _layer_names(family: str, i: int) -> dict[str, str]:
    if family == "bloom":
        p = f"transformer.h.{i}."
        return {
            "attn_norm": p + "input_layernorm",
            "mlp_norm": p + "post_attention_layernorm",
            "qkv": p + "self_attention.query_key_value",
            "o": p + "self_attention.dense",
            "up": p + "mlp.dense_h_to_4h",
            "down": p + "mlp.dense_4h_to_h",
        }
    if family == "gpt_neox":
        p = f"gpt_neox.layers.{i}."
        return {
            "attn_norm": p + "input_layernorm",
            "mlp_norm": p + "post_attention_layernorm",
            "qkv": p + "attention.query_key_value",
            "o": p + "attention.dense",
            "up": p + "mlp.dense_h_to_4h",
            "down": p + "mlp.dense_4h_to_h",
        }
    p = f"model.layers.{i}."
    names = {
        "attn_norm": p + "input_layernorm",
        "q": p + "self_attn.q_proj",
        "k": p + "self_attn.k_proj",
        "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj",
        "gate": p + "mlp.gate_proj",
        "up": p + "mlp.up_proj",
        "down": p + "mlp.down_proj",
    }
    if family == "gemma3":
        names.update(
            post_attn_norm=p + "post_attention_layernorm",
            mlp_norm=p + "pre_feedforward_layernorm",
            post_ff_norm=p + "post_feedforward_layernorm",
            q_norm=p + "self_attn.q_norm",
            k_norm=p + "self_attn.k_norm",
        )
    else:
        names["mlp_norm"] = p + "post_attention_layernorm"
    return names


def _global_names(family: str) -> dict[str, str]:
    if family == "bloom":
        return {"embed": "transformer.word_embeddings", "embed_norm": "transformer.word_embeddings_layernorm",
                "final_norm": "transformer.ln_f", "lm_head": "lm_head"}
    if family == "gpt_neox":
        return {"embed": "gpt_neox.embed_in", "final_norm": "gpt_neox.final_layer_norm", "lm_head": "lm_head"}
    return {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}


def _family_of_config(cfg) -> str:
    mt = getattr(cfg, "model_type", None)
    if mt not in _FAMILY_OF_MODEL_TYPE:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {sorted(_FAMILY_OF_MODEL_TYPE)}")
    return _FAMILY_OF_MODEL_TYPE[mt]


def _dims_of_config(family: str, cfg) -> dict[str, int]:
    heads = cfg.num_attention_heads
    inter = 4 * cfg.hidden_size if family == "bloom" else cfg.intermediate_size  # BloomMLP: fixed 4 x hidden
    if family in _FUSED_QKV:
        kv, hd = heads, cfg.hidden_size // heads
    else:
        kv = cfg.num_key_value_heads or heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "hidden": cfg.hidden_size,
        "heads": heads,
        "kv_heads": kv,
        "head_dim": hd,
        "inter": inter,
        "vocab": cfg.vocab_size,
        "layers": cfg.num_hidden_layers,
    }


def _from_hf(family: str, cfg, sd: dict[str, torch.Tensor]) -> dict:
    """HF state dict (any float dtype) -> canonical float64 representation."""
    used: set[str] = set()
    f64 = torch.float64

    def take(name: str, required: bool = True):
        if name not in sd:
            if required:
                raise ValueError(f"missing tensor {name!r} in state dict")
            return None
        used.add(name)
        return sd[name].detach().to(f64).clone()

    gemma = _gemma_like(family)

    def norm(prefix: str):
        w = take(prefix + ".weight")
        b = take(prefix + ".bias", required=False)
        if gemma:
            w = 1.0 + w
        return {"w": w, "b": b, "folded": False}

    def lin(prefix: str):
        return {"w": take(prefix + ".weight"), "b": take(prefix + ".bias", required=False)}

    dims = _dims_of_config(family, cfg)
    g = _global_names(family)
    canon: dict[str, Any] = {"family": family, "dims": dims}
    canon["embed"] = take(g["embed"] + ".weight")
    canon["final_norm"] = norm(g["final_norm"])
    canon["embed_norm"] = norm(g["embed_norm"]) if "embed_norm" in g else None
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    lm = take(g["lm_head"] + ".weight", required=not tied)
    if lm is None or tied:
        lm = canon["embed"].clone()
    canon["lm_head"] = {"w": lm, "b": None}
    canon["tied"] = tied
    layers = []
    H, KV, hd = dims["heads"], dims["kv_heads"], dims["head_dim"]
    for i in range(dims["layers"]):
        n = _layer_names(family, i)
        L: dict[str, Any] = {k: None for k in _LINEARS + _PRE_NORMS + _POST_NORMS + ("q_norm", "k_norm")}
        L["attn_norm"] = norm(n["attn_norm"])
        L["mlp_norm"] = norm(n["mlp_norm"])
        if family in _FUSED_QKV:
            qkv = lin(n["qkv"])
            w = qkv["w"].view(H, 3, hd, -1)
            b = qkv["b"].view(H, 3, hd) if qkv["b"] is not None else None
            for j, key in enumerate("qkv"):
                L[key] = {
                    "w": w[:, j].reshape(H * hd, -1).clone(),
                    "b": b[:, j].reshape(H * hd).clone() if b is not None else None,
                }
        else:
            for key in ("q", "k", "v", "gate"):
                L[key] = lin(n[key])
        for key in ("o", "up", "down"):
            L[key] = lin(n[key])
        if gemma:
            L["post_attn_norm"] = norm(n["post_attn_norm"])
            L["post_ff_norm"] = norm(n["post_ff_norm"])
            L["q_norm"] = norm(n["q_norm"])
            L["k_norm"] = norm(n["k_norm"])
        layers.append(L)
    canon["layers"] = layers
    unused = sorted(set(sd) - used - {g["lm_head"] + ".weight"})
    if unused:
        raise ValueError(f"unexpected tensors in the {family} state dict (not understood): {unused[:8]}")
    return canon


def _to_hf(canon: dict) -> dict[str, torch.Tensor]:
    """Canonical representation -> HF float32 state dict (lm_head always included)."""
    family = canon["family"]
    gemma = _gemma_like(family)
    f32 = torch.float32
    sd: dict[str, torch.Tensor] = {}

    def put_norm(prefix: str, nm: dict):
        w = nm["w"] - 1.0 if gemma else nm["w"]
        sd[prefix + ".weight"] = w.to(f32).contiguous()
        if nm["b"] is not None:
            sd[prefix + ".bias"] = nm["b"].to(f32).contiguous()

    def put_lin(prefix: str, ln: dict):
        sd[prefix + ".weight"] = ln["w"].to(f32).contiguous()
        if ln["b"] is not None:
            sd[prefix + ".bias"] = ln["b"].to(f32).contiguous()

    g = _global_names(family)
    sd[g["embed"] + ".weight"] = canon["embed"].to(f32).contiguous()
    put_norm(g["final_norm"], canon["final_norm"])
    if canon.get("embed_norm") is not None:
        put_norm(g["embed_norm"], canon["embed_norm"])
    sd[g["lm_head"] + ".weight"] = canon["lm_head"]["w"].to(f32).contiguous()
    hd = canon["dims"]["head_dim"]
    for i, L in enumerate(canon["layers"]):
        n = _layer_names(family, i)
        put_norm(n["attn_norm"], L["attn_norm"])
        put_norm(n["mlp_norm"], L["mlp_norm"])
        if family in _FUSED_QKV:
            H = L["q"]["w"].shape[0] // hd
            w = torch.stack([L[k]["w"].view(H, hd, -1) for k in "qkv"], dim=1).reshape(3 * H * hd, -1)
            qkv = {"w": w, "b": None}
            if L["q"]["b"] is not None:
                qkv["b"] = torch.stack([L[k]["b"].view(H, hd) for k in "qkv"], dim=1).reshape(3 * H * hd)
            put_lin(n["qkv"], qkv)
        else:
            for key in ("q", "k", "v", "gate"):
                put_lin(n[key], L[key])
        for key in ("o", "up", "down"):
            put_lin(n[key], L[key])
        if gemma:
            for key in ("post_attn_norm", "post_ff_norm", "q_norm", "k_norm"):
                put_norm(n[key], L[key])
    return sd


# ----------------------------------------------------------------------------------------------
# Random tiny models
# ----------------------------------------------------------------------------------------------


def _randn(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _random_norm_weight(gen: torch.Generator, n: int) -> torch.Tensor:
    """Effective norm weight, 1 + 0.3 N(0,1), kept in [0.4, 1.6] (non-trivial and safely non-zero)."""
    return (1.0 + 0.3 * _randn(gen, n)).clamp(0.4, 1.6)


def _random_canon(family: str, dims: dict, cfg, gen: torch.Generator) -> dict:
    d, H, KV, hd, inter, V = (dims[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "inter", "vocab"))
    gemma = _gemma_like(family)
    neox = family in _FUSED_QKV                       # no gate, biased MLP
    layer_norm = family in _LAYER_NORM
    attn_bias = bool(getattr(cfg, "attention_bias", False)) or family in ("qwen2", "bloom")
    mlp_bias = bool(getattr(cfg, "mlp_bias", False)) or neox

    def norm(n):
        return {"w": _random_norm_weight(gen, n), "b": 0.2 * _randn(gen, n) if layer_norm else None, "folded": False}

    def lin(out, inp, bias, bias_scale=0.1):
        return {"w": _randn(gen, out, inp) / math.sqrt(inp), "b": bias_scale * _randn(gen, out) if bias else None}

    canon: dict[str, Any] = {"family": family, "dims": dict(dims)}
    # Residual components O(1): gemma3 multiplies the embedding by sqrt(d).
    canon["embed"] = _randn(gen, V, d) / (math.sqrt(d) if gemma else 1.0)
    canon["final_norm"] = norm(d)
    canon["embed_norm"] = norm(d) if family == "bloom" else None
    canon["tied"] = bool(getattr(cfg, "tie_word_embeddings", False))
    canon["lm_head"] = {"w": canon["embed"].clone() if canon["tied"] else 3.0 * _randn(gen, V, d) / math.sqrt(d), "b": None}
    layers = []
    for _ in range(dims["layers"]):
        L: dict[str, Any] = {k: None for k in _LINEARS + _PRE_NORMS + _POST_NORMS + ("q_norm", "k_norm")}
        L["attn_norm"] = norm(d)
        L["mlp_norm"] = norm(d)
        qkv_bias_scale = 0.3 if family == "qwen2" else 0.1
        L["q"] = lin(H * hd, d, attn_bias, qkv_bias_scale)
        L["k"] = lin(KV * hd, d, attn_bias, qkv_bias_scale)
        L["v"] = lin(KV * hd, d, attn_bias, qkv_bias_scale)
        L["o"] = lin(d, H * hd, attn_bias and family != "qwen2")
        if not neox:
            L["gate"] = lin(inter, d, mlp_bias)
        L["up"] = lin(inter, d, mlp_bias)
        L["down"] = lin(d, inter, mlp_bias)
        if gemma:
            L["post_attn_norm"] = norm(d)
            L["post_ff_norm"] = norm(d)
            L["q_norm"] = norm(hd)
            L["k_norm"] = norm(hd)
        layers.append(L)
    canon["layers"] = layers
    return canon


def _build_config(family: str, vocab_size: int, special_ids: dict, overrides: dict):
    ov = dict(overrides)
    hidden = ov.get("hidden_size", 64)
    heads = ov.get("num_attention_heads", 4)
    layers = ov.get("num_hidden_layers", 3)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
    )
    if family == "bloom":
        kw = dict(common, layer_norm_epsilon=1e-5)
        kw.pop("intermediate_size")  # BloomMLP is 4 x hidden_size wide
        kw.pop("max_position_embeddings")  # ALiBi: no position table
        kw.update(ov)
        return BloomConfig(**kw)
    if family == "gpt_neox":
        kw = dict(common, rotary_pct=0.5, rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5,
                  hidden_act="gelu")
        kw.update(ov)
        return GPTNeoXConfig(**kw)
    kw = dict(common, num_key_value_heads=max(1, heads // 2), head_dim=ov.get("head_dim", hidden // heads),
              rms_norm_eps=1e-6)
    if family == "llama":
        kw.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        kw.update(ov)
        return LlamaConfig(**kw)
    if family == "qwen2":
        kw.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        kw.update(ov)
        return Qwen2Config(**kw)
    if family == "gemma3":
        kw.update(
            sliding_window=4,
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        )
        kw.update(ov)
        if "layer_types" not in ov:
            n = kw["num_hidden_layers"]
            kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        return Gemma3TextConfig(**kw)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _save_model(canon: dict, config, out_dir: Path) -> None:
    model = AutoModelForCausalLM.from_config(config)
    sd = _to_hf(canon)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (canon["tied"] and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"internal error: state dict mismatch, missing={missing[:8]} unexpected={unexpected[:8]}")
    model = model.to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)


def make_tiny_model_dir(family: str, out_dir, *, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random HF causal LM (config.json, model.safetensors, tokenizer) into ``out_dir``.

    Defaults: hidden 64, 4 query heads, 2 kv heads (gpt_neox, bloom: 4 heads MHA), head_dim 16,
    intermediate 128 (bloom: 4 * hidden = 256), 3 layers, untied ``lm_head``, vocab = tokenizer size.  qwen2 has random q/k/v
    biases; gemma3 (``gemma3_text``) alternates sliding (window 4) and full attention layers;
    gpt_neox uses ``rotary_pct`` 0.5 and a parallel residual; bloom has biases on every linear and a
    LayerNorm on the embeddings.  All norm weights (and LayerNorm biases)
    are random, non-trivial.  ``config_overrides`` go to the config class (e.g. ``hidden_size``,
    ``num_hidden_layers``, ``tie_word_embeddings``, ``vocab_size`` >= tokenizer size: the tokenizer
    is then padded with ``<|reserved_i|>`` tokens).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(_TOKENIZER_STYLE[family], out_dir)
    want_vocab = config_overrides.pop("vocab_size", None)
    if want_vocab is not None:
        if want_vocab < len(tok):
            raise ValueError(f"vocab_size={want_vocab} is smaller than the tokenizer ({len(tok)} tokens)")
        if want_vocab > len(tok):
            tok.add_tokens([f"<|reserved_{i}|>" for i in range(want_vocab - len(tok))])
            tok.save_pretrained(out_dir)
    special_ids = {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
    }
    config = _build_config(family, len(tok), special_ids, config_overrides)
    gen = torch.Generator().manual_seed(int(seed) * 1000003 + FAMILIES.index(family))
    dims = _dims_of_config(family, config)
    canon = _random_canon(family, dims, config, gen)
    _save_model(canon, config, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Upgrade spec and the individual function-preserving steps
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpgradeSpec:
    """Which function-preserving transformations to apply (see the module docstring for the math).

    Applied in the order: fold norms, vocabulary (extra then renumber), MLP neurons (extra then
    permute), heads (kv replication, extra query heads per *new* kv group, permutation), residual
    (widen then rotate), identity layers.  ``rotate_residual`` on llama/qwen2 implies ``fold_norms``
    (an orthogonal rotation only commutes with scalar norm weights).  Unsupported combinations raise
    ``ValueError``: widen / kv replication / extra heads on gpt_neox and bloom, head permutation and
    extra neurons on bloom (ALiBi slopes, fixed MLP width), a ``kv_replication`` that does
    not divide the query-group size, and (llama, gemma3) a new ``hidden_size`` not divisible by the
    new number of heads, which transformers' config validation rejects.
    """

    rotate_residual: bool = False  # llama/qwen2: orthogonal; gemma3: signed permutation; gpt_neox/bloom: permutation
    widen_residual: int = 0  # zero dims added to the residual (not gpt_neox/bloom)
    fold_norms: bool = False  # fold norm weights into the following linears
    permute_heads: bool = False  # permute kv groups and query heads within groups (not bloom)
    extra_query_heads_per_group: int = 0  # new query heads (zero o_proj columns) per kv group (not gpt_neox/bloom)
    kv_replication: int = 1  # copy every kv head this many times (not gpt_neox/bloom)
    permute_neurons: bool = False
    extra_neurons: int = 0  # new MLP neurons with zero down_proj columns (not bloom)
    identity_layers: tuple[int, ...] = ()  # positions of inserted zero-output layers in the NEW layer list
    extra_vocab: int = 0  # new tokens (new strings)
    added_token_logits: str = "mean"  # "mean": lm_head rows = mean of the old rows (greedy never picks them); "random"
    renumber_vocab: bool = False  # permute token ids
    seed: int = 0


ADDED_TOKEN_LOGITS = ("mean", "random")


def _check_spec(spec: UpgradeSpec, family: str, dims: dict) -> None:
    for name in ("widen_residual", "extra_query_heads_per_group", "extra_neurons", "extra_vocab"):
        v = getattr(spec, name)
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"UpgradeSpec.{name} must be a non-negative int, got {v!r}")
    if spec.added_token_logits not in ADDED_TOKEN_LOGITS:
        raise ValueError(f"UpgradeSpec.added_token_logits must be one of {ADDED_TOKEN_LOGITS}, got {spec.added_token_logits!r}")
    if not isinstance(spec.kv_replication, int) or spec.kv_replication < 1:
        raise ValueError(f"UpgradeSpec.kv_replication must be an int >= 1, got {spec.kv_replication!r}")
    if family == "bloom":
        if spec.widen_residual:
            raise ValueError("widen_residual is not function-preserving for bloom: LayerNorm subtracts the mean over "
                             "all hidden dims, which zero-padding changes, and head_dim = hidden_size / n_head")
        if spec.permute_heads:
            raise ValueError("permute_heads is not function-preserving for bloom: ALiBi gives every head index its "
                             "own slope, so a permuted head attends with another slope")
        if spec.extra_query_heads_per_group:
            raise ValueError("extra_query_heads_per_group is not function-preserving for bloom: ALiBi slopes depend "
                             "on the number of heads (and head_dim = hidden_size / n_head), so even a head with a "
                             "zero dense column changes the other heads")
        if spec.kv_replication != 1:
            raise ValueError("kv_replication is not supported for bloom (multi-head attention with a fused "
                             "query_key_value; the number of kv heads always equals the number of heads)")
        if spec.extra_neurons:
            raise ValueError("extra_neurons is not supported for bloom: its MLP is exactly 4 * hidden_size wide "
                             "(no config field for the intermediate size)")
    if family == "gpt_neox":
        if spec.widen_residual:
            raise ValueError("widen_residual is not function-preserving for gpt_neox: LayerNorm subtracts the "
                             "mean over all hidden dims, which zero-padding changes")
        if spec.extra_query_heads_per_group:
            raise ValueError("extra_query_heads_per_group is not supported for gpt_neox: its head size is "
                             "hidden_size // num_attention_heads, so adding heads would change the head size")
        if spec.kv_replication != 1:
            raise ValueError("kv_replication is not supported for gpt_neox (multi-head attention with a fused "
                             "query_key_value; the number of kv heads always equals the number of heads)")
    G = dims["heads"] // dims["kv_heads"]
    if G % spec.kv_replication:
        raise ValueError(f"kv_replication={spec.kv_replication} must divide the query group size "
                         f"{G} (= {dims['heads']} heads / {dims['kv_heads']} kv heads)")
    n_new = dims["layers"] + len(spec.identity_layers)
    pos = list(spec.identity_layers)
    if len(set(pos)) != len(pos) or any((not isinstance(p, int)) or p < 0 or p >= n_new for p in pos):
        raise ValueError(f"identity_layers must be distinct positions in the new layer list [0, {n_new}), got {pos}")
    new_heads = (G // spec.kv_replication + spec.extra_query_heads_per_group) * dims["kv_heads"] * spec.kv_replication
    new_hidden = dims["hidden"] + spec.widen_residual
    if family in ("llama", "gemma3") and new_hidden % new_heads:
        raise ValueError(
            f"transformers requires hidden_size % num_attention_heads == 0 for {family}: the upgrade would give "
            f"hidden_size={new_hidden} and num_attention_heads={new_heads}; change widen_residual / "
            f"extra_query_heads_per_group / kv_replication")


def _fold_norm(nm: dict, readers: list[dict]) -> None:
    g = nm["w"]
    for r in readers:
        r["w"] = r["w"] * g[None, :]
    if nm["b"] is not None:
        if (g.abs() < 1e-12).any():
            raise ValueError("cannot fold a LayerNorm with a zero weight (bias / weight undefined)")
        nm["b"] = nm["b"] / g
    nm["w"] = torch.ones_like(g)
    nm["folded"] = True


def _mlp_readers(L: dict) -> list[dict]:
    return [x for x in (L["gate"], L["up"]) if x is not None]


def _step_fold(canon: dict, fold_final: bool) -> None:
    for L in canon["layers"]:
        _fold_norm(L["attn_norm"], [L["q"], L["k"], L["v"]])
        _fold_norm(L["mlp_norm"], _mlp_readers(L))
    if fold_final:
        _fold_norm(canon["final_norm"], [canon["lm_head"]])


def _step_vocab(canon: dict, extra: int, renumber: bool, gen: torch.Generator, added_logits: str) -> list[int]:
    """Returns ``perm`` with perm[i] = new id of (extended) token i."""
    E = canon["embed"]
    V, d = E.shape
    if extra:
        lm = canon["lm_head"]["w"]
        mean_row = lm.mean(dim=0, keepdim=True).expand(extra, d).clone()   # logit = mean of the old logits
        if canon["tied"]:
            new_e = mean_row if added_logits == "mean" else _randn(gen, extra, d) * E.std()
            new_l = new_e.clone()
        else:
            new_e = _randn(gen, extra, d) * E.std()
            new_l = mean_row if added_logits == "mean" else _randn(gen, extra, d) * lm.std()
        canon["embed"] = torch.cat([E, new_e])
        canon["lm_head"]["w"] = torch.cat([lm, new_l])
    n = V + extra
    if renumber:
        perm = torch.randperm(n, generator=gen).tolist()
        inv = [0] * n
        for i, p in enumerate(perm):
            inv[p] = i
        canon["embed"] = canon["embed"][inv]
        canon["lm_head"]["w"] = canon["lm_head"]["w"][inv]
    else:
        perm = list(range(n))
    canon["dims"]["vocab"] = n
    return perm


def _step_neurons(canon: dict, extra: int, permute: bool, gen: torch.Generator) -> list[list]:
    maps = []
    for L in canon["layers"]:
        inter = L["up"]["w"].shape[0]
        src: list = list(range(inter)) + [None] * extra
        if extra:
            for key in ("gate", "up"):
                ln = L[key]
                if ln is None:
                    continue
                ln["w"] = torch.cat([ln["w"], _randn(gen, extra, ln["w"].shape[1]) * ln["w"].std()])
                if ln["b"] is not None:
                    ln["b"] = torch.cat([ln["b"], _randn(gen, extra) * ln["b"].std()])
            dn = L["down"]
            dn["w"] = torch.cat([dn["w"], torch.zeros(dn["w"].shape[0], extra, dtype=dn["w"].dtype)], dim=1)
        if permute:
            p = torch.randperm(inter + extra, generator=gen)
            for key in ("gate", "up"):
                ln = L[key]
                if ln is None:
                    continue
                ln["w"] = ln["w"][p]
                if ln["b"] is not None:
                    ln["b"] = ln["b"][p]
            L["down"]["w"] = L["down"]["w"][:, p]
            src = [src[i] for i in p.tolist()]
        maps.append(src)
    canon["dims"]["inter"] += extra
    return maps


def _step_heads(canon: dict, r: int, extra: int, permute: bool, gen: torch.Generator) -> tuple[list, list]:
    dims = canon["dims"]
    H, KV, hd = dims["heads"], dims["kv_heads"], dims["head_dim"]
    G = H // KV
    G2 = G // r + extra
    KV2 = KV * r
    q_maps, kv_maps = [], []
    for L in canon["layers"]:
        d = L["q"]["w"].shape[1]
        # q: [KV, G, hd, d] -> [KV2, G/r, hd, d]  (same query-head order)
        qw = L["q"]["w"].view(KV2, G // r, hd, d)
        qb = L["q"]["b"].view(KV2, G // r, hd) if L["q"]["b"] is not None else None
        ow = L["o"]["w"].view(-1, KV2, G // r, hd)
        q_src = torch.arange(H).view(KV2, G // r)
        kv_src = torch.arange(KV).repeat_interleave(r)
        kw = L["k"]["w"].view(KV, hd, d).repeat_interleave(r, dim=0)
        vw = L["v"]["w"].view(KV, hd, d).repeat_interleave(r, dim=0)
        kb = L["k"]["b"].view(KV, hd).repeat_interleave(r, dim=0) if L["k"]["b"] is not None else None
        vb = L["v"]["b"].view(KV, hd).repeat_interleave(r, dim=0) if L["v"]["b"] is not None else None
        if extra:
            std = L["q"]["w"].std()
            qw = torch.cat([qw, _randn(gen, KV2, extra, hd, d) * std], dim=1)
            if qb is not None:
                qb = torch.cat([qb, _randn(gen, KV2, extra, hd) * L["q"]["b"].std()], dim=1)
            ow = torch.cat([ow, torch.zeros(ow.shape[0], KV2, extra, hd, dtype=ow.dtype)], dim=2)
            q_src = torch.cat([q_src, torch.full((KV2, extra), -1, dtype=q_src.dtype)], dim=1)
        if permute:
            gp = torch.randperm(KV2, generator=gen)
            inner = torch.stack([torch.randperm(G2, generator=gen) for _ in range(KV2)])  # [KV2, G2]
            rows = gp[:, None].expand(KV2, G2)
            qw = qw[rows, inner]
            ow = ow[:, rows, inner]
            q_src = q_src[rows, inner]
            if qb is not None:
                qb = qb[rows, inner]
            kw, vw, kv_src = kw[gp], vw[gp], kv_src[gp]
            kb = kb[gp] if kb is not None else None
            vb = vb[gp] if vb is not None else None
        L["q"]["w"] = qw.reshape(KV2 * G2 * hd, d)
        L["q"]["b"] = qb.reshape(KV2 * G2 * hd) if qb is not None else None
        L["o"]["w"] = ow.reshape(ow.shape[0], KV2 * G2 * hd)
        L["k"]["w"] = kw.reshape(KV2 * hd, d)
        L["v"]["w"] = vw.reshape(KV2 * hd, d)
        L["k"]["b"] = kb.reshape(KV2 * hd) if kb is not None else None
        L["v"]["b"] = vb.reshape(KV2 * hd) if vb is not None else None
        q_maps.append([None if x < 0 else int(x) for x in q_src.reshape(-1).tolist()])
        kv_maps.append([int(x) for x in kv_src.tolist()])
    dims["heads"] = KV2 * G2
    dims["kv_heads"] = KV2
    return q_maps, kv_maps


def _all_pre_norms(canon: dict):
    """(norm, readers, is_final) for every norm that is read by linears."""
    for L in canon["layers"]:
        yield L["attn_norm"], [L["q"], L["k"], L["v"]], False
        yield L["mlp_norm"], _mlp_readers(L), False
    yield canon["final_norm"], [canon["lm_head"]], True


def _all_writers(canon: dict):
    for L in canon["layers"]:
        yield L["o"]
        yield L["down"]


def _step_widen(canon: dict, k: int, gen: torch.Generator) -> torch.Tensor:
    """Residual h -> c [h; 0] with c = sqrt(D/d).  Returns T (D x d)."""
    family = canon["family"]
    d = canon["dims"]["hidden"]
    D = d + k
    c = math.sqrt(D / d)
    emb_factor = 1.0 if _gemma_like(family) else c

    def pad_cols(W, extra_cols):
        return torch.cat([W, extra_cols], dim=1)

    canon["embed"] = emb_factor * pad_cols(canon["embed"], torch.zeros(canon["embed"].shape[0], k, dtype=torch.float64))
    for wr in _all_writers(canon):
        wr["w"] = c * torch.cat([wr["w"], torch.zeros(k, wr["w"].shape[1], dtype=torch.float64)])
        if wr["b"] is not None:
            wr["b"] = c * torch.cat([wr["b"], torch.zeros(k, dtype=torch.float64)])
    for nm, readers, is_final in _all_pre_norms(canon):
        tied_head = is_final and canon["tied"]
        a = emb_factor if tied_head else 1.0
        if nm["folded"]:
            assert not tied_head, "a folded final norm implies an untied lm_head"
            nm["w"] = torch.ones(D, dtype=torch.float64)
            scale = 1.0 / c
        else:
            nm["w"] = torch.cat([nm["w"], _random_norm_weight(gen, k)]) / (c * a)
            scale = a
        if nm["b"] is not None:  # pragma: no cover - LayerNorm is never widened (gpt_neox is rejected)
            raise AssertionError("LayerNorm cannot be widened")
        for r in readers:
            extra_cols = torch.zeros(r["w"].shape[0], k, dtype=torch.float64) if tied_head else (
                _randn(gen, r["w"].shape[0], k) * r["w"].std())
            r["w"] = pad_cols(scale * r["w"], extra_cols)
    for L in canon["layers"]:
        for key in _POST_NORMS:
            if L[key] is not None:
                L[key]["w"] = torch.cat([L[key]["w"], _random_norm_weight(gen, k)])
    canon["dims"]["hidden"] = D
    T = torch.zeros(D, d, dtype=torch.float64)
    T[:d] = c * torch.eye(d, dtype=torch.float64)
    return T


def _random_orthogonal(gen: torch.Generator, n: int) -> torch.Tensor:
    A = _randn(gen, n, n)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R))[None, :]


def _random_signed_perm(gen: torch.Generator, n: int, signs: bool) -> torch.Tensor:
    perm = torch.randperm(n, generator=gen)
    s = torch.ones(n, dtype=torch.float64)
    if signs:
        s[torch.rand(n, generator=gen, dtype=torch.float64) < 0.5] = -1.0
    P = torch.zeros(n, n, dtype=torch.float64)
    P[torch.arange(n), perm] = s  # (P x)_i = s_i x_perm(i)
    return P


def _step_rotate(canon: dict, gen: torch.Generator) -> torch.Tensor:
    """Residual h -> P h.  Returns P (D x D)."""
    family = canon["family"]
    D = canon["dims"]["hidden"]
    if family in ("llama", "qwen2"):
        P = _random_orthogonal(gen, D)
        diag_ok = False
    else:
        P = _random_signed_perm(gen, D, signs=(family == "gemma3"))
        diag_ok = True
    Pabs = P.abs()
    canon["embed"] = canon["embed"] @ P.T
    for wr in _all_writers(canon):
        wr["w"] = P @ wr["w"]
        if wr["b"] is not None:
            wr["b"] = P @ wr["b"]
    if canon.get("embed_norm") is not None:  # bloom: LN(E P^T) rows = P LN(e) with w, b permuted
        canon["embed_norm"]["w"] = Pabs @ canon["embed_norm"]["w"]
        canon["embed_norm"]["b"] = P @ canon["embed_norm"]["b"]
    for nm, readers, _ in _all_pre_norms(canon):
        if not nm["folded"]:
            if not diag_ok:
                raise AssertionError("internal: rotation of an unfolded norm")
            nm["w"] = Pabs @ nm["w"]
        if nm["b"] is not None:
            nm["b"] = P @ nm["b"]  # only gpt_neox / bloom (unsigned permutation)
        for r in readers:
            r["w"] = r["w"] @ P.T
    for L in canon["layers"]:
        for key in _POST_NORMS:
            if L[key] is not None:
                L[key]["w"] = Pabs @ L[key]["w"]
    return P


def _zero_output_layer(template: dict, gen: torch.Generator) -> dict:
    """A random layer shaped like ``template`` whose residual writers are zero (adds exactly 0)."""
    L: dict[str, Any] = {}
    for key, val in template.items():
        if val is None:
            L[key] = None
        elif key in _LINEARS:
            w = val["w"]
            b = val["b"]
            if key in ("o", "down"):
                L[key] = {"w": torch.zeros_like(w), "b": torch.zeros_like(b) if b is not None else None}
            else:
                L[key] = {
                    "w": _randn(gen, *w.shape) * w.std(),
                    "b": _randn(gen, *b.shape) * b.std() if b is not None else None,
                }
        else:  # norm
            n = val["w"].shape[0]
            L[key] = {
                "w": torch.ones(n, dtype=torch.float64) if val["folded"] else _random_norm_weight(gen, n),
                "b": 0.2 * _randn(gen, n) if val["b"] is not None else None,
                "folded": val["folded"],
            }
    return L


def _step_identity_layers(canon: dict, positions: tuple[int, ...], layer_types: list | None, gen) -> tuple[dict, list | None]:
    old = canon["layers"]
    n_new = len(old) + len(positions)
    pos = set(positions)
    new_layers, new_types, layer_map = [], [] if layer_types is not None else None, {}
    it = 0
    for j in range(n_new):
        if j in pos:
            template = old[min(it, len(old) - 1)]  # shapes / biases / folded flags of a real layer
            new_layers.append(_zero_output_layer(template, gen))
            if new_types is not None:
                if new_types:
                    new_types.append(new_types[-1])
                else:
                    # position 0: copy the next real layer's type
                    new_types.append(layer_types[0])
        else:
            layer_map[it] = j
            new_layers.append(old[it])
            if new_types is not None:
                new_types.append(layer_types[it])
            it += 1
    canon["layers"] = new_layers
    canon["dims"]["layers"] = n_new
    return layer_map, new_types


# ----------------------------------------------------------------------------------------------
# Tokenizer editing
# ----------------------------------------------------------------------------------------------


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


def _upgrade_tokenizer(old_dir: Path, new_dir: Path, n_rows_old: int, extra: int, perm: list[int],
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


# ----------------------------------------------------------------------------------------------
# The upgrade
# ----------------------------------------------------------------------------------------------


def _load_model_dir(model_dir: Path):
    if not (model_dir / "model.safetensors").exists() and not (model_dir / "model.safetensors.index.json").exists():
        raise ValueError(f"{model_dir} has no model.safetensors (only safetensors checkpoints are supported)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    return cfg, sd


def upgrade_model_dir(old_dir, new_dir, spec: UpgradeSpec) -> Path:
    """Write an exactly function-preserving upgrade of the HF model in ``old_dir`` into ``new_dir``.

    Also writes the ground truth ``lorasuite_upgrade.json`` (token_map, layer_map, spec, head /
    neuron maps) and ``lorasuite_upgrade.safetensors`` (the residual transform ``T``).
    """
    old_dir, new_dir = Path(old_dir), Path(new_dir)
    cfg, sd = _load_model_dir(old_dir)
    family = _family_of_config(cfg)
    old_dims = _dims_of_config(family, cfg)
    _check_spec(spec, family, old_dims)
    canon = _from_hf(family, cfg, sd)
    gen = torch.Generator().manual_seed(int(spec.seed) * 7919 + 17)
    rng = random.Random(int(spec.seed) * 104729 + 3)

    was_tied = canon["tied"]
    force_fold = spec.rotate_residual and family in ("llama", "qwen2")
    do_fold = spec.fold_norms or force_fold
    fold_final = do_fold and (not was_tied or force_fold)
    if do_fold:
        _step_fold(canon, fold_final)
    if fold_final and was_tied:
        canon["tied"] = False  # the folded lm_head differs from the embedding from now on

    n_rows_old = canon["embed"].shape[0]
    perm = _step_vocab(canon, spec.extra_vocab, spec.renumber_vocab, gen, spec.added_token_logits)
    neuron_maps = _step_neurons(canon, spec.extra_neurons, spec.permute_neurons, gen)
    q_maps, kv_maps = _step_heads(canon, spec.kv_replication, spec.extra_query_heads_per_group, spec.permute_heads, gen)

    d_old = canon["dims"]["hidden"]
    T = torch.eye(d_old, dtype=torch.float64)
    if spec.widen_residual:
        T = _step_widen(canon, spec.widen_residual, gen)
    if spec.rotate_residual:
        T = _step_rotate(canon, gen) @ T

    layer_types = list(cfg.layer_types) if getattr(cfg, "layer_types", None) is not None else None
    layer_map, new_types = _step_identity_layers(canon, tuple(sorted(spec.identity_layers)), layer_types, gen)

    tied_new = canon["tied"] and torch.equal(canon["lm_head"]["w"], canon["embed"])
    canon["tied"] = tied_new

    # ---- config
    dims = canon["dims"]
    cfg_dict = cfg.to_dict()
    token_map = {i: perm[i] for i in range(n_rows_old)}

    def map_id(x):
        if x is None:
            return None
        if isinstance(x, list):
            return [token_map[i] for i in x]
        return token_map[x]

    keys = _FAMILY_CONFIG_KEYS.get(family, _CONFIG_KEYS)
    cfg_dict.update({keys[k]: dims[k] for k in ("layers", "heads", "inter") if keys[k] is not None})
    cfg_dict.update(
        hidden_size=dims["hidden"],
        vocab_size=dims["vocab"],
        tie_word_embeddings=tied_new,
        bos_token_id=map_id(cfg_dict.get("bos_token_id")),
        eos_token_id=map_id(cfg_dict.get("eos_token_id")),
        pad_token_id=map_id(cfg_dict.get("pad_token_id")),
        dtype="float32",
    )
    if family not in _FUSED_QKV:
        cfg_dict.update(num_key_value_heads=dims["kv_heads"], head_dim=dims["head_dim"])
    if new_types is not None:
        cfg_dict["layer_types"] = new_types
    for k in ("_name_or_path", "transformers_version", "architectures"):
        cfg_dict.pop(k, None)
    new_cfg = AutoConfig.for_model(**cfg_dict)
    if _dims_of_config(family, new_cfg) != dims:
        raise RuntimeError(f"internal: config dims {_dims_of_config(family, new_cfg)} != {dims}")

    new_dir.mkdir(parents=True, exist_ok=True)
    _save_model(canon, new_cfg, new_dir)
    new_strings = _upgrade_tokenizer(old_dir, new_dir, n_rows_old, spec.extra_vocab, perm, rng)

    # ---- ground truth
    def per_old_layer(maps):
        return {str(i): m for i, m in enumerate(maps)}

    spec_dict = dataclasses.asdict(spec)
    spec_dict["identity_layers"] = list(spec.identity_layers)
    truth = {
        "format": 1,
        "family": family,
        "spec": spec_dict,
        "token_map": {str(k): v for k, v in token_map.items()},
        "layer_map": {str(k): v for k, v in layer_map.items()},
        "new_token_ids": [perm[n_rows_old + j] for j in range(spec.extra_vocab)],
        "new_token_strings": new_strings,
        "old_dims": old_dims,
        "new_dims": dict(dims),
        "residual_scale": math.sqrt(dims["hidden"] / d_old),
        "norms_folded": do_fold,
        "final_norm_folded": fold_final,
        "tie_word_embeddings": {"old": was_tied, "new": tied_new},
        "heads": per_old_layer(q_maps),
        "kv_heads": per_old_layer(kv_maps),
        "neurons": per_old_layer(neuron_maps),
        "residual_file": RESIDUAL_FILE,
    }
    (new_dir / GROUND_TRUTH_FILE).write_text(json.dumps(truth, indent=1), encoding="utf-8")
    save_file({"residual": T.contiguous()}, str(new_dir / RESIDUAL_FILE))
    return new_dir


# ----------------------------------------------------------------------------------------------
# Random LoRA adapters
# ----------------------------------------------------------------------------------------------


def make_random_lora_adapter(model_dir, out_dir, *, rank: int = 4, alpha: int = 8, seed: int = 0, targets=None,
                             strength: float = 0.5) -> Path:
    """Write a PEFT LoRA adapter for the model in ``model_dir`` with random, non-zero A *and* B.

    Every adapted linear gets ``||(alpha/rank) B A||_F = strength * ||W||_F``; the default 0.5 changes
    the logits by about as much as their own magnitude (max |dlogit| ~ max |logit|).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    family = _family_of_config(model.config)
    targets = list(targets) if targets is not None else list(DEFAULT_LORA_TARGETS[family])
    lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = get_peft_model(model, lcfg)
    gen = torch.Generator().manual_seed(int(seed) * 31337 + 11)
    scaling = alpha / rank
    n = 0
    with torch.no_grad():
        for name, module in sorted(peft_model.named_modules(), key=lambda x: x[0]):
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            A = module.lora_A["default"].weight
            B = module.lora_B["default"].weight
            W = module.get_base_layer().weight.to(torch.float64)
            a = _randn(gen, *A.shape) / math.sqrt(A.shape[1])
            b = _randn(gen, *B.shape) / math.sqrt(B.shape[1])
            delta = scaling * (b @ a)
            b = b * (strength * W.norm() / delta.norm())
            A.copy_(a.to(A.dtype))
            B.copy_(b.to(B.dtype))
            n += 1
    if n == 0:
        raise ValueError(f"no LoRA modules were created for targets {targets}")
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir

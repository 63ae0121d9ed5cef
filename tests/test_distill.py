"""Teacher-distilled LFT on a tiny exact upgrade (CPU, seconds): prompts, targets, KL, synthesis, end to end."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.errors import LorasuiteError
from lorasuite_core.pipeline.options import MigrationOptions
from lorasuite_core.training import distill as D
from lorasuite_core.training import prompts as P
from lorasuite_core.training.task_data import generate_problems
from lorasuite_core.training.config import default_lft_config
from lorasuite_core.training.train import ADAPTER_WEIGHTS, collate, load_for_light_finetune
from tests.distill_setup import build_exact_pair

GEN = {"max_new_tokens": 16, "batch_size": 8}


def lft_config(**overrides):
    base = dict(lr=MigrationOptions().lft_lr, device="cpu", dtype="float32", autocast="off", batch_size=4, max_length=256,
                show_progress=False)
    return default_lft_config(**{**base, **overrides})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_exact_pair(tmp_path_factory.mktemp("distill_pair"))


@pytest.fixture(scope="module")
def teacher(pair):
    return D.load_for_generation(pair["old"], pair["adapter"], dtype="float32", device="cpu")


# --------------------------------------------------------------------------- prompt files

def test_read_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("How many apples?\n\n  Tom has 3 pens. How many now?  \n")
    assert P.read_prompts(str(tmp_path / "p.txt")) == [P.Prompt("How many apples?"),
                                                       P.Prompt("Tom has 3 pens. How many now?")]
    (tmp_path / "p.jsonl").write_text('{"prompt": "What is 2 + 3?"}\n\n'
                                      '{"instruction": "Add them.", "input": "4 and 5", "answer": "9"}\n'
                                      '{"instruction": "Solve it.", "output": "ignored"}\n')
    prompts = P.read_prompts(str(tmp_path / "p.jsonl"))
    assert prompts == [P.Prompt("What is 2 + 3?"), P.Prompt("Add them.", "4 and 5"), P.Prompt("Solve it.")]
    assert "### Input:\n4 and 5" in prompts[1].formatted() and prompts[0].formatted().endswith("### Response:\n")
    assert P.read_prompts(str(tmp_path / "p.jsonl"), limit=1) == prompts[:1]
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "Q one?"}, {"prompt": "Q two?"}]))
    assert [p.text for p in P.read_prompts(str(tmp_path / "p.json"))] == ["Q one?", "Q two?"]
    bad = {"bad.jsonl": ('{"prompt": "ok"}\n{"question": "no field"}\n', r"bad\.jsonl: line 2 has neither"),
           "broken.jsonl": ('{"prompt": \n', r"broken\.jsonl: line 1 is not JSON"),
           "empty.txt": ("\n\n", r"empty\.txt holds no prompts"),
           "obj.json": ('{"prompt": "x"}', r"obj\.json: a \.json prompt file must hold a list"),
           "p.csv": ("a,b\n", r"p\.csv: use \.txt")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(LorasuiteError, match=message):
            P.read_prompts(str(tmp_path / name))
    with pytest.raises(LorasuiteError, match=r"missing\.txt does not exist"):
        P.read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)))
    with pytest.raises(LorasuiteError, match=r"bin\.txt (is not UTF-8|holds NUL)"):
        P.read_prompts(str(tmp_path / "bin.txt"))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(LorasuiteError, match=r"dir\.jsonl is a directory"):
        P.read_prompts(str(tmp_path / "dir.jsonl"))


def test_split_heldout_is_seeded_and_disjoint():
    prompts = P.prompts_from_samples(generate_problems(10, "train", 0))
    train, heldout = P.split_heldout(prompts, 3, seed=1)
    assert len(train) == 7 and len(heldout) == 3 and not set(train) & set(heldout)
    assert P.split_heldout(prompts, 3, seed=1) == (train, heldout) and P.split_heldout(prompts, 3, seed=2) != (train, heldout)
    with pytest.raises(ValueError, match="n_heldout"):
        P.split_heldout(prompts, 10)


# --------------------------------------------------------------------------- agreement

def test_answers_agree_on_final_numbers_else_on_text():
    assert D.answers_agree("4 + 1 = 5. The answer is 5.", "The answer is 5.0") is True
    assert D.answers_agree("The answer is 1,200.", "so 1200") is True
    assert D.answers_agree("The answer is 6.", "The answer is 5.") is False
    assert D.answers_agree("no number here", "no   number here") is True
    assert D.answers_agree("no number here", "The answer is 5.") is False
    assert D.answers_agree("The answer is 5. ### Instruction: 7", "The answer is 5.") is True  # scored part only
    assert D.teacher_agreement(["1", "2", "x", "y"], ["1", "3", "x", "z"]) == 0.5
    with pytest.raises(ValueError, match="3 student completions for 2"):
        D.teacher_agreement(["1", "2", "3"], ["1", "2"])


def test_agreement_of_a_word_answer_skill_uses_its_scorer():
    from lorasuite_core.training import skills

    task = "family_relationships"
    teacher = "The answer is mother."
    assert D.answers_agree("Let me think. The answer is Mother.", teacher, task) is True    # the same word
    assert D.answers_agree("The answer is father.", teacher, task) is False                # another word
    assert D.answers_agree("Let me think. The answer is Mother.", teacher) is False        # the text rule: no number
    assert D.answers_agree("The answer is mother. The answer is father.", teacher, task) is True   # first answer
    assert D.answers_agree("", teacher, task) is False
    assert D.answers_agree("no idea", "no  idea", task) is False   # the teacher's first line is its answer
    assert D.teacher_agreement(["The answer is aunt.", "The answer is uncle."], [teacher, "The answer is uncle."],
                               [task, task]) == 0.5
    with pytest.raises(ValueError, match="1 tasks for 2"):
        D.teacher_agreement(["a", "b"], ["a", "b"], [task])
    # each registered skill: its own right output agrees with itself, another sample's output does not
    for name in ("knowledge", "bfcl", "letter_counting", "arithmetic"):
        first, second = skills.get_skill(name).samples("test", 2, 0)
        assert D.answers_agree(first.output, first.output, name) and not D.answers_agree(second.output, first.output, name)
    assert D.answers_agree("get_weather(city = 'Paris' , unit='C')", "get_weather(unit='c', city='paris')", "bfcl")
    assert not D.answers_agree("get_weather(city='Paris')", "get_weather(unit='c', city='paris')", "bfcl")
    # gold samples are scored by their skill, gold strings by the final number
    gold = skills.get_skill(task).samples("test", 2, 0)
    assert D.accuracy([gold[0].output, gold[0].output], gold) == (0.5 if gold[0].answer != gold[1].answer else 1.0)


def test_task_prompts_take_their_skills_stop_rule_budget_and_cut(teacher, monkeypatch):
    from lorasuite_core.training import skills

    model, tokenizer = teacher
    skill = skills.get_skill("family_relationships")
    sample = skill.samples("test", 1, 0)[0]
    prompts = [P.Prompt(sample.instruction, task=skill.name), P.Prompt(sample.instruction)]
    assert P.prompts_from_samples([sample]) == prompts[:1] and prompts[0].sample().task == skill.name
    task, plain = D.greedy_completions(model, tokenizer, prompts, batch_size=8)
    assert 0 < len(task.ids) <= skill.max_new_tokens and 0 < len(plain.ids) <= D.DEFAULT_MAX_NEW_TOKENS
    assert task.text == skill.target_text(tokenizer.decode(list(task.ids), skip_special_tokens=True))
    # the skill's budget and stop rule (here: after 3 characters) end its prompts' rows, not the other prompt's
    monkeypatch.setattr(skill, "max_new_tokens", 4)
    budget, plain_again = D.greedy_completions(model, tokenizer, prompts, batch_size=8)
    assert 0 < len(budget.ids) <= 4 and budget.ids == task.ids[:len(budget.ids)] and plain_again == plain
    monkeypatch.setattr(skill, "finished", lambda text: len(text) >= 3)
    short, plain_again = D.greedy_completions(model, tokenizer, prompts, batch_size=8, max_new_tokens=30)
    assert len(tokenizer.decode(list(short.ids))) >= 3 > len(tokenizer.decode(list(short.ids[:-1])))
    assert short.ids == task.ids[:len(short.ids)]


def test_greedy_completions_keep_the_generated_ids(teacher):
    model, tokenizer = teacher
    prompts = P.prompts_from_samples(generate_problems(4, "test", 0))
    completions = D.greedy_completions(model, tokenizer, prompts, **GEN)
    assert len(completions) == 4 and all(0 < len(c.ids) <= 16 for c in completions)
    for c in completions:  # the ids decode to the scored text (byte tokens may not survive a re-encoding)
        assert tokenizer.decode(list(c.ids), skip_special_tokens=True).rstrip().startswith(c.text)
    assert D.greedy_completions(model, tokenizer, prompts[::-1], **GEN) == completions[::-1]  # order-independent


# --------------------------------------------------------------------------- the token-level KL term

def _reference_kl(student, teacher, chunk, token_map):
    """KL(p || q) per aligned pair from the models' own full forward passes (no labelled_logits)."""
    rows = []
    for example in chunk:
        s_logits = student(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        t_ex = example["teacher"]
        t_logits = teacher(input_ids=torch.tensor([t_ex["input_ids"]])).logits[0]
        s_all = [i - 1 for i, label in enumerate(example["labels"]) if label != -100]
        t_all = [i - 1 for i, label in enumerate(t_ex["labels"]) if label != -100]
        s_pos = [s_all[j] for _, j in example["kl_pairs"]]
        t_pos = [t_all[i] for i, _ in example["kl_pairs"]]
        p = torch.softmax(t_logits[t_pos][:, token_map.teacher_ids].double(), -1)
        q = torch.softmax(s_logits[s_pos][:, token_map.student_ids].double(), -1)
        rows.append((p * (p.log() - q.log())).sum(-1))
    return torch.cat(rows).mean()


def test_kl_term_equals_its_definition(pair, teacher):
    """Student = new + migrated, KL teacher = the *bare* old model (so the KL is far from 0): loss - CE == KL."""
    teacher_model, teacher_tok = teacher
    prompts = P.prompts_from_samples(generate_problems(3, "train", 5))
    completions = D.greedy_completions(teacher_model, teacher_tok, prompts, **GEN)
    bare_teacher, _ = D.load_for_generation(pair["old"], dtype="float32", device="cpu")
    student, student_tok = load_for_light_finetune(pair["new"], pair["migrated"], dtype="float32", device="cpu")
    token_map = D.TokenMap.between(teacher_tok, student_tok)
    assert token_map.identity and len(token_map) == len(student_tok)
    chunk = D.distillation_examples(student_tok, teacher_tok, prompts, completions, 256, token_map)
    assert all("teacher" in e for e in chunk)
    assert [e["input_ids"][-len(c.ids) - 1:-1] for e, c in zip(chunk, completions)] == [list(c.ids) for c in completions]
    assert [e["kl_pairs"] for e in chunk] == [[(j, j) for j in range(len(c.ids) + 1)] for c in completions]
    ce_only = D.distillation_loss(None, token_map, kl_weight=2.0, temperature=1.0, student_pad_id=student_tok.pad_token_id,
                                  teacher_pad_id=teacher_tok.pad_token_id)(student, chunk)
    with_kl = D.distillation_loss(bare_teacher, token_map, kl_weight=2.0, temperature=1.0,
                                  student_pad_id=student_tok.pad_token_id,
                                  teacher_pad_id=teacher_tok.pad_token_id)(student, chunk)
    reference = _reference_kl(student, bare_teacher, chunk, token_map)
    assert reference > 0.1
    torch.testing.assert_close((with_kl - ce_only).double() / 2.0, reference, rtol=1e-4, atol=1e-6)
    exact = D.distillation_loss(teacher_model, token_map, kl_weight=2.0, temperature=1.0,
                                student_pad_id=student_tok.pad_token_id,
                                teacher_pad_id=teacher_tok.pad_token_id)(student, chunk)
    assert abs((exact - ce_only).item()) < 1e-5  # exact upgrade: the teacher's distribution is the student's
    with_kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)


def test_kl_through_a_renumbered_vocabulary(tmp_path):
    """New tokenizer: ids permuted + added tokens. Targets are the student's own encoding of the teacher's
    text; on canonical completions every position aligns and the KL of an exact upgrade is ~0; a generated
    byte that is not valid UTF-8 ends the aligned part of its example."""
    from lorasuite_core.models.tokens import _byte_level_decoder, token_surfaces
    from lorasuite_core.testing.upgrade import UpgradeSpec
    from lorasuite_core.transfer.vocab import shared_vocabulary

    pair = build_exact_pair(tmp_path, UpgradeSpec(renumber_vocab=True, extra_vocab=6, permute_heads=True))
    teacher_model, teacher_tok = D.load_for_generation(pair["old"], pair["adapter"], dtype="float32", device="cpu")
    student, student_tok = load_for_light_finetune(pair["new"], pair["migrated"], dtype="float32", device="cpu")
    assert teacher_tok.get_vocab() != student_tok.get_vocab()
    assert D.TokenMap.between(teacher_tok, student_tok) is None  # no map without the shared vocabulary
    shared = shared_vocabulary(teacher_tok, student_tok)
    token_map = D.TokenMap.between(teacher_tok, student_tok, (shared.old_ids, shared.new_ids))
    assert not token_map.identity and len(token_map) == len(shared) + 1  # + the EOS pair
    prompts = P.prompts_from_samples(generate_problems(3, "train", 2))
    texts = [" the man saw the dog", " our teacher wrote 12", " a young boy paid the driver"]
    completions = [D.Completion(t, tuple(teacher_tok(t, add_special_tokens=False)["input_ids"])) for t in texts]
    chunk = D.distillation_examples(student_tok, teacher_tok, prompts, completions, 256, token_map)
    for example, completion in zip(chunk, completions, strict=True):
        target = example["input_ids"][-len(completion.ids) - 1:-1]
        assert target == [token_map.student_of(t) for t in completion.ids] != list(completion.ids)
        assert example["kl_pairs"] == [(j, j) for j in range(len(target) + 1)]   # same segmentation: all align
    args = dict(kl_weight=1.0, temperature=2.0, student_pad_id=student_tok.pad_token_id,
                teacher_pad_id=teacher_tok.pad_token_id)
    ce = D.distillation_loss(None, token_map, **args)(student, chunk)
    total = D.distillation_loss(teacher_model, token_map, **args)(student, chunk)
    assert ce > 0.5 and abs((total - ce).item()) < 1e-5
    batch = collate(chunk, student_tok.pad_token_id)
    assert batch["input_ids"].max() < student.get_base_model().config.vocab_size

    generated = D.greedy_completions(teacher_model, teacher_tok, prompts, **GEN)   # tiny random model: byte soup
    parted = 0
    for example, completion in zip(D.distillation_examples(student_tok, teacher_tok, prompts, generated, 256,
                                                           token_map), generated, strict=True):
        target = [label for label in example["labels"] if label != -100][:-1]
        assert target == student_tok(completion.text, add_special_tokens=False)["input_ids"]
        t_bytes, s_bytes = (token_surfaces(tok, ids) for tok, ids in ((teacher_tok, completion.ids), (student_tok, target)))
        same = b"".join(t_bytes) == b"".join(s_bytes)
        pairs = example.get("kl_pairs", [])
        n = len(pairs) - same                           # the EOS pair only where both spell the same bytes
        # one tokenizer renumbered: the segmentations agree token for token up to where the spellings part
        assert n >= 1 and pairs[:n] == [(k, k) for k in range(n)]
        assert [token_map.student_of(t) for t in completion.ids[:n]] == target[:n]
        assert b"".join(t_bytes[:n]) == b"".join(s_bytes[:n])
        if not same:   # ... and the first teacher token not compared is where they part
            parted += 1
            head = b"".join(t_bytes[:n + 1])
            assert head != b"".join(s_bytes)[:len(head)]
    assert parted >= 1   # the generated completions do exercise a spelling that parts

    # "a" + an incomplete 4-byte sequence (3 bytes) + "x": the student reads U+FFFD, also 3 bytes, so "x" starts
    # at the same offset and maps -- yet the bytes before it differ, so it predicts a different event
    to_char = {b: c for c, b in _byte_level_decoder().items()}
    ids = teacher_tok.convert_tokens_to_ids(["a", *(to_char[b] for b in b"\xf0\x9f\x98"), "x"])
    student_ids = student_tok(teacher_tok.decode(ids), add_special_tokens=False)["input_ids"]
    assert len(student_ids) == len(ids) and token_map.student_of(ids[-1]) == student_ids[-1]
    assert D.aligned_positions(teacher_tok, ids, student_tok, student_ids, token_map) == [(0, 0)]


def _toy_tokenizers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bl = Tokenizer(models.BPE(vocab={"</s>": 0, "1": 1, "5": 2, "15": 3, "Ġ": 4, "Ġ+": 5, "+": 6}, merges=[]))
    bl.pre_tokenizer, bl.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    sp = Tokenizer(models.BPE(vocab={"<eos>": 0, "<0x31>": 1, "1": 2, "5": 3, "15": 4, "▁+": 5, "▁": 6}, merges=[]))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    return (PreTrainedTokenizerFast(tokenizer_object=bl, eos_token="</s>"),
            PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="<eos>"))


def test_aligned_positions_compare_the_same_next_token_event():
    """Teacher "15"+"Ġ+" against student "1"+"5"+"▁+": only the "+" position (same offset, mapped token) and
    EOS compare; a student spelling other bytes compares nowhere; byte fallbacks are not paired."""
    from lorasuite_core.transfer.vocab import shared_vocabulary

    teacher_tok, student_tok = _toy_tokenizers()
    shared = shared_vocabulary(teacher_tok, student_tok)
    token_map = D.TokenMap.between(teacher_tok, student_tok, (shared.old_ids, shared.new_ids))
    assert token_map.student_of(1) == 2 and token_map.student_of(0) == 0   # "1" -> "1" (not <0x31>), EOS -> EOS
    assert D.aligned_positions(teacher_tok, [3, 5], student_tok, [2, 3, 5], token_map) == [(1, 2), (2, 3)]
    assert D.aligned_positions(teacher_tok, [3, 5], student_tok, [4, 5], token_map) == [(0, 0), (1, 1), (2, 2)]
    assert D.aligned_positions(teacher_tok, [3, 5], student_tok, [2, 5], token_map) == []     # "1 +" is not "15 +"


def test_kl_is_skipped_with_a_reason_without_a_map(pair, teacher, tmp_path):
    teacher_model, teacher_tok = teacher
    prompts = P.prompts_from_samples(generate_problems(2, "train", 1))
    completions = D.greedy_completions(teacher_model, teacher_tok, prompts, **GEN)
    run = D.distill_finetune(pair["new"], pair["migrated"], prompts, completions, tmp_path / "seq",
                             config=lft_config(), teacher=teacher_model, teacher_tokenizer=teacher_tok,
                             token_map=None)
    assert run.mode == D.MODE_SEQUENCE and run.kl_examples == 0 and "no shared-token map" in run.kl_note
    identity = D.TokenMap.between(teacher_tok, teacher_tok)
    with_kl = D.distill_finetune(pair["new"], pair["migrated"], prompts, completions, tmp_path / "kl",
                                 config=lft_config(), teacher=teacher_model, teacher_tokenizer=teacher_tok,
                                 token_map=identity)
    off = D.distill_finetune(pair["new"], pair["migrated"], prompts, completions, tmp_path / "off",
                             config=lft_config(), teacher=teacher_model, teacher_tokenizer=teacher_tok,
                             token_map=identity, kl_weight=0.0)
    assert with_kl.mode == D.MODE_KL and with_kl.kl_examples == 2 and off.mode == D.MODE_SEQUENCE
    assert off.kl_note == "kl_weight is 0"
    # same targets (teacher ids) either way; at the exact start the KL adds nothing to the first loss
    assert abs(with_kl.training.losses[0] - off.training.losses[0]) < 1e-5
    assert run.training.losses[0] > off.training.losses[0]  # text targets: byte tokens re-encode differently


# --------------------------------------------------------------------------- end to end

def test_distillation_from_an_unlabelled_prompt_file_end_to_end(pair, tmp_path):
    records = [{"instruction": s.instruction, "input": s.input} for s in generate_problems(10, "train", 4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts, heldout = P.split_heldout(P.read_prompts(str(tmp_path / "prompts.jsonl")), 4, seed=0)
    # Random tiny weights give flat next-token distributions: their greedy text has near-ties that the default
    # LFT step (Adam, lr 9e-4) crosses on held-out prompts (1.0 -> 0.33-0.75 measured); a real trained adapter's
    # answers do not sit on ties.  A small step still moves every LoRA weight (checked below).
    config = D.DistillConfig(max_new_tokens=16, train=lft_config(lr=1e-5))
    out = tmp_path / "distilled"
    report = D.distill(pair["old"], pair["adapter"], pair["new"], pair["migrated"], out, prompts, heldout=heldout,
                       config=config)
    assert report.mode == D.MODE_KL and report.n_prompts == 6 and report.kl_examples == 6
    assert report.n_heldout == 4 and report.training["steps"] == 2
    assert report.teacher_agreement_before == 1.0 and report.teacher_agreement_after == 1.0
    assert [c.text for c in report.heldout_student] == [c.text for c in report.heldout_teacher]
    before, after = load_file(str(pair["migrated"] / ADAPTER_WEIGHTS)), load_file(str(out / ADAPTER_WEIGHTS))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    data = report.to_dict()
    assert "heldout_teacher" not in data and "losses" not in data["training"]
    assert json.loads(json.dumps(data))["teacher_agreement_after"] == 1.0


# --------------------------------------------------------------------------- prompt synthesis

PERMISSIVE = P.SynthesisConfig(require_question=False, min_chars=5, max_new_tokens=16, batch_size=4, max_rounds=3)


def test_synthesis_is_deterministic_by_seed_and_excludes_given_prompts(teacher):
    model, tokenizer = teacher
    seeds = P.prompts_from_samples(generate_problems(3, "train", 0))
    evaluation = [s.instruction for s in generate_problems(5, "test", 0)]
    first = P.synthesise_prompts(model, tokenizer, seeds, 4, seed=0, exclude=evaluation, config=PERMISSIVE)
    again = P.synthesise_prompts(model, tokenizer, seeds, 4, seed=0, exclude=evaluation, config=PERMISSIVE)
    other = P.synthesise_prompts(model, tokenizer, seeds, 4, seed=1, exclude=evaluation, config=PERMISSIVE)
    assert len(first) == 4 and first == again and first != other
    assert len({p.text for p in first}) == 4
    # the same seed would write exactly ``first`` again: given as evaluation prompts, none of them may come back
    fresh = P.synthesise_prompts(model, tokenizer, seeds, 4, seed=0, exclude=evaluation + [p.text for p in first],
                                 config=PERMISSIVE)
    taken = P.NearDuplicateIndex(PERMISSIVE.near_duplicate, evaluation + [p.text for p in first + seeds])
    assert fresh and not any(taken.contains(p.text) for p in fresh)


def test_prompts_are_written_by_the_teachers_base_model(pair, teacher):
    """The adapter disabled: the teacher writes exactly what its old model alone writes (a task adapter would
    answer the seed questions instead); ``with_adapter`` writes with it."""
    from dataclasses import replace

    from lorasuite_core.training.evaluation import load_for_generation

    model, tokenizer = teacher
    base, _ = load_for_generation(pair["old"], dtype="float32", device="cpu")
    seeds = P.prompts_from_samples(generate_problems(3, "train", 0))
    written = P.synthesise_prompts(model, tokenizer, seeds, 4, seed=0, config=PERMISSIVE)
    assert written == P.synthesise_prompts(base, tokenizer, seeds, 4, seed=0, config=PERMISSIVE)
    with_adapter = replace(PERMISSIVE, with_adapter=True)
    assert P.synthesise_prompts(model, tokenizer, seeds, 4, seed=0, config=with_adapter) != written


def test_a_candidate_ends_where_the_writer_starts_the_next_list_item():
    config = P.SynthesisConfig()
    text = " Tim had 24 marbles and gave 2 away. How many are left? Question: Ann has 3 pens. How many now?\nmore"
    assert P.clean_candidate(text, config) == "Tim had 24 marbles and gave 2 away. How many are left?"
    assert P.clean_candidate(" 39 - 6 = 33. The answer is 33.", config) is None    # an answer, not a question


def test_synthesis_filters_evaluation_prompts_and_near_duplicates(teacher, monkeypatch):
    model, tokenizer = teacher
    seeds = [P.Prompt("Tom has 3 apples and buys 4 more. How many apples does Tom have now?")]
    evaluation = ["A hall has 5 rows of chairs with 6 chairs in each row. How many chairs are in the hall?"]
    lines = [
        evaluation[0],                                                                  # verbatim
        " a HALL has 5 rows of chairs, with 6 chairs in each row -- how many chairs are in the hall?",  # case/punct
        "A hall has 5 rows of chairs with 6 chairs in each row. How many chairs are in the big hall?",  # near dup
        seeds[0].text,                                                                  # a seed
        "Tom has 3 apples and buys 4 more. How many apples does Tom have now? Also",    # seed, cut after '?'
        "No question mark here at all, just words",                                     # not a question
        "Why?",                                                                         # too short
        "Mia bakes 12 cookies and gives 5 to Omar. How many cookies are left?\nNext",   # new; first line only
        "Mia bakes 12 cookies and gives 5 to Omar. How many cookies are left?",         # repeat of the new one
        "A train carries 40 people and 13 get off at the station. How many people remain?",
    ]
    monkeypatch.setattr(P, "_sample_continuations", lambda *args: list(lines))
    kept = P.synthesise_prompts(model, tokenizer, seeds, 5, seed=0, exclude=evaluation,
                                config=P.SynthesisConfig(max_rounds=2))
    assert [p.text for p in kept] == ["Mia bakes 12 cookies and gives 5 to Omar. How many cookies are left?",
                                      "A train carries 40 people and 13 get off at the station. How many people remain?"]
    monkeypatch.setattr(P, "_sample_continuations", lambda *args: [evaluation[0]])
    with pytest.raises(LorasuiteError, match="no usable prompt"):
        P.synthesise_prompts(model, tokenizer, seeds, 2, exclude=evaluation, config=P.SynthesisConfig(max_rounds=2))


def test_synthesis_budget_grows_with_the_number_asked(monkeypatch):
    """A teacher that keeps one candidate in ten still gets enough rounds: ceil(12 n / batch) by default."""
    calls = []

    def one_in_ten(model, tokenizer, requests, config, torch_seed):
        calls.append(len(requests))
        return [f" How many pens does pupil {len(calls)}-{i} hold now?" if i % 10 == 0 else "no question here"
                for i in range(len(requests))]

    monkeypatch.setattr(P, "_sample_continuations", one_in_ten)
    config = P.SynthesisConfig(batch_size=10, near_duplicate=0.99)
    kept = P.synthesise_prompts(None, None, ["How many apples are left?"], 30, config=config)
    assert len(kept) == 30 and len(calls) == 30                     # one kept per round of 10; budget 36 rounds
    calls.clear()
    monkeypatch.setattr(P, "_sample_continuations", lambda *a: ["nothing"] * 10)
    with pytest.raises(LorasuiteError, match="no usable prompt .* in 36 rounds"):
        P.synthesise_prompts(None, None, ["How many apples are left?"], 30, config=config)


def test_synthesis_refuses_seeds_without_a_question_before_sampling(monkeypatch):
    """Seeds of which none has a '?' (chain_sum's "... 91 - 78 + 35 =") could only burn the sampling budget."""
    def never(*args):
        raise AssertionError("sampled")

    monkeypatch.setattr(P, "_sample_continuations", never)
    seeds = ["State the final answer to the following arithmetic problem: 91 - 78 + 35 =", "Add 6 + 1 + 3 ="]
    with pytest.raises(LorasuiteError, match="none of the 2 seed prompts is one"):
        P.synthesise_prompts(None, None, seeds, 5)
    monkeypatch.setattr(P, "_sample_continuations", lambda *a: [" Add 2 + 2 and say it ="])
    assert [p.text for p in P.synthesise_prompts(None, None, seeds, 1, config=PERMISSIVE)] == ["Add 2 + 2 and say it ="]


def test_prompts_carry_their_task(tmp_path):
    from lorasuite_core.training.prompts import load_prompts

    assert {p.task for p in load_prompts("task:family_relationships:train:3", None, 0)} == {"family_relationships"}
    assert {p.task for p in load_prompts("builtin:train", 3, 0)} == {None}          # builtin: the final-number rules
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Who is Ann to Bob?", "task": "family_relationships"}\n{"prompt": "2+2?"}\n')
    assert [p.task for p in P.read_prompts(str(path))] == ["family_relationships", None]
    path.write_text('{"prompt": "q", "task": "nope"}\n')
    with pytest.raises(LorasuiteError, match="line 1: unknown task 'nope'"):
        P.read_prompts(str(path))

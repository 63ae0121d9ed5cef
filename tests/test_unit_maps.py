"""The pair's cached unit maps (the ``unit_maps`` stage) give the adapters of the direct path, bit for bit.

The direct path is :func:`~lorasuite_core.transfer.adapter.transfer_new_layer` with no maps given: each
layer pair's unit maps computed inline, as every adapter computed them before the stage existed.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorasuite_core.models.loading import load_base_model, load_lora_adapter
from lorasuite_core.models.writing import adapter_tensors
from lorasuite_core.pipeline import pair_stages, plans, stages
from lorasuite_core.pipeline.options import AnalysisOptions, MigrationOptions
from lorasuite_core.pipeline.runner import EntryRun, InProcess, Runner, migrate_in_process, pair_head_transform
from lorasuite_core.pipeline.stage_store import StageStore
from lorasuite_core.pipeline.unit_map_store import load_layer_maps, save_unit_maps
from lorasuite_core.testing.adapter import make_random_lora_adapter
from lorasuite_core.testing.model import make_tiny_model_dir
from lorasuite_core.testing.upgrade import UpgradeSpec, upgrade_model_dir
from lorasuite_core.transfer import adapter as transfer_adapter
from lorasuite_core.transfer.adapter import combine_layers, sources_by_new_layer, transfer_new_layer
from lorasuite_core.transfer.unit_maps import RoleMap
from tests.test_adalora_dora import make_dora_adapter

UPGRADE = UpgradeSpec(rotate_residual=True, widen_residual=16, permute_heads=True, extra_query_heads_per_group=1, kv_replication=2,
                      permute_neurons=True, extra_neurons=8, identity_layers=(1,), seed=7)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("unit-maps")
    old = make_tiny_model_dir("llama", root / "old", seed=1)
    new = upgrade_model_dir(old, root / "new", UPGRADE)
    adapters = {"lora": make_random_lora_adapter(old, root / "lora", rank=4, alpha=8, seed=2),
                "lora2": make_random_lora_adapter(old, root / "lora2", rank=3, alpha=6, seed=3),
                "dora": make_dora_adapter(old, root / "dora", seed=4)}
    return old, new, adapters


class Counting:
    """Wraps ``transfer.adapter.role_maps`` (where maps are computed) and counts the calls."""

    def __init__(self, monkeypatch):
        self.calls, wrapped = 0, transfer_adapter.role_maps

        def counted(*args, **kwargs):
            self.calls += 1
            return wrapped(*args, **kwargs)
        monkeypatch.setattr(transfer_adapter, "role_maps", counted)


def direct(old_dir, new_dir, adapter_dir, store_root, mode):
    """The adapter's tensors by the direct path, over the pair analysis in the store."""
    plan = plans.plan_pair(str(old_dir), str(new_dir), AnalysisOptions(), mode)
    store = StageStore.at(str(store_root))
    analysis = pair_stages.pair_analysis(store, plan, store.location("head_similarity", plan.stage_keys["head_similarity"]))
    old, new = load_base_model(old_dir), load_base_model(new_dir)
    adapter = load_lora_adapter(adapter_dir, old.family)
    sources = sources_by_new_layer(analysis.layer_mapping, {layer for layer, _ in adapter.factors})
    results = [transfer_new_layer(old, new, analysis, adapter, j, sources[j], mode) for j in sorted(sources)]
    return adapter_tensors(new, combine_layers(new, results))


def assert_bit_identical(out_dir, expected):
    written = load_file(out_dir / "adapter_model.safetensors")
    assert sorted(written) == sorted(expected)
    for key, tensor in expected.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key


def migrate(pair, kind, mode, store, out):
    old, new, adapters = pair
    options = MigrationOptions(head_transform=mode, lft=False, fidelity=False)
    return migrate_in_process(old, new, adapters[kind], out, options, cache_root=str(store))


@pytest.mark.parametrize("mode", ["lstsq", "paper"])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_cached_maps_give_the_direct_paths_adapter(pair, kind, mode, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(stages, "load_layer_maps", lambda *a: loads.append(a) or load_layer_maps(*a))
    report = migrate(pair, kind, mode, tmp_path / "store", tmp_path / "out")
    assert report["steps"]["unit_maps"]["cache"] == "computed" and loads    # the layer jobs read the stored maps
    assert_bit_identical(tmp_path / "out", direct(*pair[:2], pair[2][kind], tmp_path / "store", mode))


def test_second_adapter_reuses_the_maps(pair, tmp_path, monkeypatch):
    migrate(pair, "lora", "lstsq", tmp_path / "store", tmp_path / "first")
    counter = Counting(monkeypatch)
    report = migrate(pair, "lora2", "lstsq", tmp_path / "store", tmp_path / "second")
    assert report["steps"]["unit_maps"]["cache"] == "reused" and report["steps"]["transfer"]["cache"] == "computed"
    assert counter.calls == 0                                                  # no map computed for this adapter
    assert_bit_identical(tmp_path / "second", direct(*pair[:2], pair[2]["lora2"], tmp_path / "store", "lstsq"))


def test_a_fleet_in_two_modes_caches_the_default_and_computes_the_other(pair, tmp_path):
    old, new, adapters = pair
    entries = [EntryRun(name=mode, adapter=str(adapters["lora"]), output=str(tmp_path / mode),
                        options=MigrationOptions(head_transform=mode, lft=False, fidelity=False))
               for mode in ("paper", "lstsq")]
    assert pair_head_transform(entries) == "lstsq" and pair_head_transform(entries[:1]) == "paper"
    run = Runner(InProcess(), str(tmp_path / "store")).run(str(old), str(new), AnalysisOptions(), entries)
    assert run.plan.head_transform == "lstsq" and [e.status for e in entries] == ["published", "published"]
    assert [job.unit_maps for e in entries for job in e.plan.layers] == \
           [False] * len(entries[0].plan.layers) + [True] * len(entries[1].plan.layers)
    for e in entries:
        assert_bit_identical(tmp_path / e.name, direct(old, new, adapters["lora"], tmp_path / "store", e.name))


def test_stored_maps_round_trip_and_refuse_a_mismatch(tmp_path):
    g = torch.Generator().manual_seed(0)
    maps = {(0, 1): {"q": RoleMap(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.randn(2, 3, 2, generator=g,
                                                                                           dtype=torch.float64),
                                  3, 4, 0.1 + 0.2),
                     "down": RoleMap(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                     torch.zeros(0, 1, 1, dtype=torch.float64), 5, 6, 0.0)}}
    save_unit_maps(maps, "lstsq", tmp_path / "maps")
    loaded = load_layer_maps(tmp_path / "maps", 0, 1, "lstsq")
    for role, m in maps[(0, 1)].items():
        got = loaded[role]
        assert torch.equal(got.a, m.a) and torch.equal(got.b, m.b) and torch.equal(got.M, m.M)
        assert (got.n_old, got.n_new, got.fit, got.M.dtype) == (m.n_old, m.n_new, m.fit, m.M.dtype)
    with pytest.raises(ValueError, match="mode 'lstsq', asked for 'paper'"):
        load_layer_maps(tmp_path / "maps", 0, 1, "paper")
    with pytest.raises(ValueError, match="onto new layer 1, asked for 2"):
        load_layer_maps(tmp_path / "maps", 0, 2, "lstsq")
    with pytest.raises(ValueError, match="no unit maps for old layer 3"):
        load_layer_maps(tmp_path / "maps", 3, 1, "lstsq")


def test_the_float32_carry_gives_the_float64_maps_to_float32_precision(monkeypatch):
    """The W_old · T products run in CARRY_DTYPE; the maps and fits stay within float32 rounding of an all-float64
    computation, on unrelated random weights (no exact map to recover) at a width where rounding adds up."""
    from lorasuite_core.models.loading import Dims
    from lorasuite_core.transfer import unit_maps as U
    from lorasuite_core.transfer.matching import LayerMatch

    g = torch.Generator().manual_seed(0)
    d, D, hd, F = 256, 384, 32, 512
    do = Dims(hidden=d, num_layers=1, num_heads=d // hd, num_kv_heads=2, head_dim=hd, intermediate=F, norm_eps=1e-6)
    dn = Dims(hidden=D, num_layers=1, num_heads=D // hd, num_kv_heads=2, head_dim=hd, intermediate=F, norm_eps=1e-6)

    def weights(dims):
        q, kv = dims.num_heads * hd, dims.num_kv_heads * hd
        shapes = {"q": (q, dims.hidden), "k": (kv, dims.hidden), "v": (kv, dims.hidden), "o": (dims.hidden, q),
                  "gate": (F, dims.hidden), "up": (F, dims.hidden), "down": (dims.hidden, F)}
        return {role: torch.randn(*shape, generator=g, dtype=torch.float64) for role, shape in shapes.items()}

    old_w, new_w = weights(do), weights(dn)
    maps = {"attention_input": torch.randn(d, D, generator=g, dtype=torch.float64) / D ** 0.5,
            "mlp_input": torch.randn(d, D, generator=g, dtype=torch.float64) / D ** 0.5,
            "attention_output": torch.randn(D, d, generator=g, dtype=torch.float64) / d ** 0.5,
            "mlp_output": torch.randn(D, d, generator=g, dtype=torch.float64) / d ** 0.5}
    match = LayerMatch(head_pairs=[(i, i) for i in range(do.num_heads)], kv_pairs=[(0, 1), (1, 0)],
                       neuron_pairs=torch.stack([torch.arange(F), torch.randperm(F, generator=g)], 1).numpy(),
                       head_similarity=None, neuron_similarity_mean=0.0)
    P = torch.randn(d, D, generator=g, dtype=torch.float64)
    fast = U.role_maps(old_w, new_w, do, dn, maps, match, "lstsq", P)
    monkeypatch.setattr(U, "CARRY_DTYPE", torch.float64)
    reference = U.role_maps(old_w, new_w, do, dn, maps, match, "lstsq", P)
    assert set(fast) == set(U.INPUT_ROLES + U.OUTPUT_ROLES)
    for role, ref in reference.items():
        got = fast[role]
        assert got.M.dtype == torch.float64 and torch.equal(got.a, ref.a) and torch.equal(got.b, ref.b)
        error = float((got.M - ref.M).norm() / ref.M.norm())
        assert 0 < error < 1e-5, (role, error)              # float32 rounding: present, and small
        assert got.fit == pytest.approx(ref.fit, rel=1e-5)

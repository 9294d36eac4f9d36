"""The band around the memory estimate: priors, confidence, and calibration's spread."""

import math
from statistics import NormalDist

import pytest

from autotune.calibrate.calibration import Correction, apply
from autotune.util.errors import AutotuneError
from autotune.cost.assess import estimate
from autotune.cost.memory import CUDA_CONTEXT
from autotune.cost.recipe import Recipe
from autotune.cost.uncertainty import CONFIDENCE, PRIORS, band, z
from tests.conftest import TINY

MiB = 2**20


@pytest.fixture(autouse=True)
def priors_only(monkeypatch):
    """Most tests here are about the priors: hide the fitted scores that ship."""
    monkeypatch.setattr("autotune.cost.uncertainty.fits", dict)


@pytest.fixture(scope="module")
def memory(pm):
    return estimate(pm, TINY["llama-gqa"], Recipe(method="lora", batch=2, seq_len=64)).memory


def correction(n=10, spread=None):
    return Correction(gpu="a100-80gb", n=n, tensor_scale=1.1, fragmentation=0.08,
                      device_overhead=700 * MiB, efficiency=1.0,
                      spread={"tensor": 0.02, "peak": 0.03} if spread is None else spread)


def test_the_band_holds_the_peak_and_widens_with_confidence(memory):
    b = band(memory)
    assert 0 <= b.low <= memory.peak <= b.high
    assert (b.confidence, b.source) == (CONFIDENCE, "priors")
    wide = band(memory, confidence=0.999)
    assert wide.low < b.low and wide.high > b.high
    assert set(b.to_dict()) == {"low_bytes", "high_bytes", "confidence", "source", "components"}
    assert b.to_dict()["components"]["device_overhead"] == {
        "low_bytes": b.components["device_overhead"][0],
        "high_bytes": b.components["device_overhead"][1]}


def test_on_the_cpu_the_band_is_tensors_only(memory):
    b = band(memory, device="cpu")
    assert "device_overhead" not in b.components
    assert b.low <= memory.tensor_peak <= b.high < band(memory).high


def test_components_add_in_quadrature(memory):
    b = band(memory)
    k = NormalDist().inv_cdf(CONFIDENCE)
    ups = [PRIORS[name][1] * value for name, value in memory.breakdown.items()]
    downs = [PRIORS[name][0] * value for name, value in memory.breakdown.items()]
    slack = memory.device_overhead - (context := CUDA_CONTEXT)
    assert not memory.mixed_blocks  # LoRA on dense layers
    ups += [PRIORS["cuda_context"][1] * context, PRIORS["allocator_reserve"][1] * slack]
    downs += [PRIORS["cuda_context"][0] * context, PRIORS["allocator_reserve"][0] * slack]
    assert b.high - memory.peak == pytest.approx(k * math.hypot(*ups), abs=1)
    assert memory.peak - b.low == pytest.approx(k * math.hypot(*downs), abs=1)
    # the same sum from the components' own bounds
    values = {**memory.breakdown, "device_overhead": memory.device_overhead}
    assert b.high - memory.peak == pytest.approx(
        math.hypot(*(b.components[name][1] - value for name, value in values.items())), abs=9)
    # the device overhead is uncertain mostly upward: the context and the allocator's slack
    low, high = b.components["device_overhead"]
    assert high - memory.device_overhead > memory.device_overhead - low


def test_z_is_the_one_sided_normal_quantile():
    assert z(0.95) == pytest.approx(NormalDist().inv_cdf(0.95)) == pytest.approx(1.6449, abs=1e-4)
    assert z(0.999) > z(0.95)
    for bad in (0.5, 1.0, 0.3, 1.5, float("nan")):
        with pytest.raises(AutotuneError, match="confidence"):
            z(bad)
    with pytest.raises(AutotuneError):
        band(None, confidence=1.0)


def test_a_calibration_with_a_spread_replaces_the_priors(pm):
    raw = estimate(pm, TINY["llama-gqa"], Recipe(method="lora", batch=8, seq_len=64)).memory
    fit = correction()
    calibrated = apply(raw, fit)
    b = band(calibrated, correction=fit)
    assert b.source == "calibration (a100-80gb, 10 runs)"
    assert b.low <= calibrated.peak <= b.high
    priors = band(calibrated)
    assert priors.high - priors.low > b.high - b.low
    # one measured ratio moves every tensor component: they add up, not in quadrature
    k, tensor = z(CONFIDENCE), 0.02 * math.sqrt(1.1)
    spread = math.hypot(tensor * calibrated.tensor_peak, 0.03 * math.sqrt(1.1) * calibrated.peak)
    assert b.high - calibrated.peak == pytest.approx(k * spread, abs=1)
    activations = calibrated.breakdown["activations"]
    assert b.components["activations"][1] == math.ceil(activations * (1 + k * tensor))
    assert "calibration" in b.components


def test_a_tiny_spread_is_floored(memory):
    fit = correction(spread={"tensor": 0.0, "peak": 0.0})
    b = band(apply(memory, fit), correction=fit, device="cpu")
    assert b.high - b.low > 2 * z(CONFIDENCE) * 0.01 * memory.tensor_peak


@pytest.mark.parametrize("fit", [correction(n=1, spread={"tensor": 0.0, "peak": 0.0}),
                                 correction(spread={"tensor": None, "peak": None})],
                         ids=["one-run", "no-spread"])
def test_without_a_spread_the_priors_stay(memory, fit):
    calibrated = apply(memory, fit)
    b = band(calibrated, correction=fit)
    assert b.source.startswith("priors") and "a100-80gb" in b.source
    assert b.low <= calibrated.peak <= b.high
    delta = calibrated.breakdown["calibration"]
    assert b.components["calibration"][1] == math.ceil(
        delta + z(CONFIDENCE) * PRIORS["calibration"][1] * delta)


def test_a_missing_peak_spread_keeps_the_overhead_priors(memory):
    fit = correction(spread={"tensor": 0.02, "peak": None})
    b = band(apply(memory, fit), correction=fit)
    assert b.source == "calibration (a100-80gb, 10 runs; device overhead from priors)"


def fit_of(scores, **extra):
    return {"cuda": {"label": "GPU fit", "unit": "published runs", "scores": scores, **extra}}


def test_a_fitted_band_is_the_conformal_quantile_times_the_prior_widths(memory, monkeypatch):
    from autotune.cost.uncertainty import prior_widths, quantile

    scores = [i / 10 for i in range(-9, 10)]  # 19 scores: rank ceil(20 x 0.95) = 19, the largest
    assert quantile(scores, 0.95) == 0.9 and quantile(scores, 0.5) == 0.0
    assert quantile(scores[:18], 0.95) is None  # too few for 95%
    monkeypatch.setattr("autotune.cost.uncertainty.fits", lambda: fit_of(scores))
    b = band(memory)
    widths = prior_widths(memory, "cuda")
    assert b.source == "GPU fit (19 published runs)"
    assert b.high - memory.peak == pytest.approx(0.9 * sum(w[1] for w in widths.values()), abs=1)
    assert memory.peak - b.low == pytest.approx(0.9 * sum(w[0] for w in widths.values()), abs=1)
    # too few scores for the confidence asked: the priors answer
    assert band(memory, confidence=0.99).source == "priors"


def test_a_gpu_fit_may_refit_the_upward_widths_of_the_overhead(memory, monkeypatch):
    from autotune.cost.uncertainty import prior_widths

    ups = {"cuda_context": 2.0, "allocator_reserve": 0.1, "allocator_reserve_mixed": 3.0}
    scores = [i / 10 for i in range(-9, 10)]
    monkeypatch.setattr("autotune.cost.uncertainty.fits",
                        lambda: fit_of(scores, overhead_widths=ups))
    widths = prior_widths(memory, "cuda", ups)
    reserve = memory.device_overhead - CUDA_CONTEXT
    assert widths["device_overhead"] == pytest.approx(
        (PRIORS["cuda_context"][0] * CUDA_CONTEXT + PRIORS["allocator_reserve"][0] * reserve,
         2.0 * CUDA_CONTEXT + 0.1 * reserve))
    assert widths["activations"] == prior_widths(memory, "cuda")["activations"]
    b = band(memory)
    assert b.high - memory.peak == pytest.approx(0.9 * sum(w[1] for w in widths.values()), abs=1)


@pytest.mark.parametrize("name, recipe, mixed", [
    ("llama-gqa", Recipe(method="lora"), False),
    ("llama-gqa", Recipe(method="qlora", bits=4), False),
    ("llama-gqa", Recipe(method="dora"), True),
    ("llama-gqa", Recipe(method="full"), True),
    ("llama-gqa", Recipe(method="freeze", freeze_layers=1), True),
    ("deepseek-v2-moe", Recipe(method="lora"), True),
])
def test_mixed_blocks_widen_the_prior_reserve(pm, name, recipe, mixed):
    """Weight-sized gradients, DoRA's weight norms or routed experts' token groups between
    the activations make the allocator's reserve less predictable: a wider prior."""
    from autotune.cost.uncertainty import prior_widths, reserve_prior

    est = estimate(pm, TINY[name], recipe.but(batch=2, seq_len=64)).memory
    assert est.mixed_blocks is mixed
    assert reserve_prior(est) == ("allocator_reserve_mixed" if mixed else "allocator_reserve")
    reserve = est.device_overhead - CUDA_CONTEXT
    up = prior_widths(est, "cuda")["device_overhead"][1]
    assert up == pytest.approx(PRIORS["cuda_context"][1] * CUDA_CONTEXT
                               + PRIORS[reserve_prior(est)][1] * reserve)
    assert apply(est, correction()).mixed_blocks is mixed  # a calibration keeps it


def test_a_score_is_the_residual_over_the_prior_widths(memory):
    from autotune.cost.uncertainty import fitted_band, prior_widths, score

    up = sum(w[1] for w in prior_widths(memory, "cuda").values())
    assert score(memory, memory.peak + int(up), "cuda") == pytest.approx(1.0, abs=1e-6)
    assert score(memory, memory.peak, "cuda") == 0
    assert fitted_band(memory, "cuda", 0.95) is None  # nothing fitted (fixture)


def test_a_cover_all_fit_holds_every_fitted_case(memory, monkeypatch):
    scores = [0.0] * 30 + [2.5]
    monkeypatch.setattr("autotune.cost.uncertainty.fits", lambda: fit_of(scores, cover_all=True))
    from autotune.cost.uncertainty import score

    b = band(memory)
    worst = [m for m in range(memory.peak, 2 * memory.peak, 2**20)
             if score(memory, m, "cuda") <= 2.5][-1]
    assert b.high >= worst


def test_a_stored_score_never_narrows_the_band_it_was_fitted_to_give(memory, monkeypatch):
    """Rounded to four decimals toward zero, the largest fitted score (the 95% quantile of
    19) left that published run 0.02% outside its own bound."""
    from autotune.cost.uncertainty import score, stored

    measured = int(memory.peak * 1.1) + 7
    exact = score(memory, measured, "cuda")
    assert stored(exact) >= exact and stored(-exact) <= -exact
    monkeypatch.setattr("autotune.cost.uncertainty.fits",
                        lambda: fit_of([0.0] * 18 + [stored(exact)]))
    assert band(memory).high >= measured


def test_a_band_source_names_its_evidence_in_one_word():
    from autotune.cost.uncertainty import source_kind

    assert source_kind("GPU fit (19 published runs)") == "gpu-fit"
    assert source_kind("CPU fit (53 measured CPU steps)") == "cpu-fit"
    assert source_kind("calibration (a100-80gb, 3 runs)") == "calibration"
    assert source_kind("priors") == "priors"


def test_estimate_json_names_the_library_versions_and_the_bounds_evidence(pm):
    import json
    from importlib.metadata import version

    from click.testing import CliRunner

    from autotune.cli.main import make_cli

    result = CliRunner().invoke(make_cli(pm), ["estimate", "--model", "llama-2-7b", "--json"])
    report = json.loads(result.output)
    assert set(report["libraries"]) == {"torch", "transformers", "peft", "bitsandbytes", "trl"}
    assert report["libraries"]["transformers"] == version("transformers")
    assert report["memory"]["bound_source"] == "priors"  # the fixture hides the fits
    human = CliRunner().invoke(make_cli(pm), ["estimate", "--model", "llama-2-7b"]).output
    assert f"transformers {version('transformers')}" in human and "from priors" in human

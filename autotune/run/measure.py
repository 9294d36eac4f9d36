"""Measure real training steps: peak tensor memory and tokens/s, on CUDA or on the CPU.

The step is the one the cost model predicts: the model built from its config in the
recipe's dtype (bitsandbytes-quantised for 8/4-bit bases, then
``prepare_model_for_kbit_training`` as the executor does), adapters as PEFT makes them,
autocast for 16-bit compute, and several optimizer steps so optimizer state exists at the
peak. Peak tensor memory is ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU it is
the running total of the allocator's own events, recorded by the PyTorch profiler, which
is exact and reproducible to the byte.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import asdict, dataclass, field

from autotune.cost.recipe import TORCH_DTYPES, Recipe

STEP_MARK = "autotune_step_"


@dataclass
class Measurement:
    """What a few real optimizer steps used."""

    peak_tensor_bytes: int
    tokens_per_s: float
    device: str
    steps: int
    losses: list[float] = field(default_factory=list)
    reserved_bytes: int | None = None
    trainer: str | None = None
    """The stage whose own trainer took the steps (:func:`measure_stage`); ``None``: the
    plain causal-LM loop of :func:`measure`, the model's own loss."""

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(config: dict, recipe: Recipe, target_modules: list[str] | str | None = None,
                device: str = "cpu", seed: int = 0, planned=None):
    """A randomly initialised model prepared for ``recipe`` exactly as training would.

    ``planned``: ``(family, arch, counts)`` as the plan priced them; the model then gets
    the plan's adapter targets and expert quantisation, and passes the post-load audit
    (:mod:`autotune.run.audit`) before any step is measured.
    """
    from autotune.cost.params import named_targets, peft_targets
    from autotune.run.loading import load_base, prepare

    if planned is None:
        return prepare(load_base(config, recipe, None, device, seed), recipe, target_modules)
    from autotune.run.audit import audit

    family, arch, counts = planned
    params = None
    if recipe.adapter and (target_modules is not None or named_targets(arch, recipe, counts)):
        target_modules, params = peft_targets(counts)
    model = prepare(load_base(config, recipe, None, device, seed,
                              experts=family.expert_parameters(config)),
                    recipe, target_modules, params)
    audit(model, arch, recipe, counts)
    return model


def make_optimizer(recipe: Recipe, params, lr: float = 1e-4):
    """The optimizer Hugging Face's Trainer makes for ``recipe.optim``."""
    import torch

    params = [p for p in params if p.requires_grad]
    if recipe.optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if recipe.optim == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if recipe.optim == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if recipe.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=0.0)


def train_steps(model, recipe: Recipe, vocab: int, steps: int, device: str, seed: int = 0,
                mark=None, autocast: bool = True, padded: bool = False) -> list[float]:
    """Run ``steps`` optimizer steps on random tokens; return the losses.

    ``autocast=False``: a pure 16-bit loop (no autocast) for 16-bit weights; ``padded``: a
    batch of several padded to one length, as a collator pads it (an attention mask with
    the first row one token short).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (recipe.batch, recipe.seq_len), generator=generator).to(device)
    mask = None
    if padded and recipe.batch > 1:
        mask = torch.ones_like(ids)
        mask[0, -1] = 0
    optimizer = make_optimizer(recipe, model.parameters())
    autocast = (torch.autocast(device_type=device.split(":")[0],
                               dtype=getattr(torch, TORCH_DTYPES[recipe.compute_dtype]))
                if recipe.compute_dtype != "fp32" and (autocast or recipe.weight_dtype == "fp32")
                else contextlib.nullcontext())
    losses = []
    for step in range(steps):
        with mark(step) if mark else contextlib.nullcontext():
            with autocast:
                loss = model(input_ids=ids, labels=ids, attention_mask=mask).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        del loss
    return losses


def measure(config: dict, recipe: Recipe, target_modules: list[str] | str | None = None,
            steps: int = 3, device: str = "cpu", seed: int = 0, planned=None,
            autocast: bool = True, padded: bool = True) -> Measurement:
    """Peak tensor bytes over optimizer steps 2..``steps`` and tokens/s, measured for real.

    ``planned``: ``(family, arch, counts)`` of the plan, to build and audit the model as
    the plan priced it (see :func:`build_model`); ``autocast=False``: a pure 16-bit loop;
    ``padded``: a batch of several is padded to one length, as the default stage's
    collator pads it (see :func:`train_steps`); ``False``: full rows, no mask.
    """
    if steps < 2:
        raise ValueError("need at least two steps: optimizer state exists from the second on")
    if device.startswith("cuda"):
        return _measure_cuda(config, recipe, target_modules, steps, device, seed, planned,
                             autocast, padded)
    return _measure_cpu(config, recipe, target_modules, steps, seed, planned, autocast, padded)


def _measure_cpu(config, recipe, target_modules, steps, seed, planned=None,
                 autocast=True, padded=False) -> Measurement:
    from torch.profiler import ProfilerActivity, profile, record_function

    from autotune.util.quiet import native_stderr_quiet

    gc.collect()
    with native_stderr_quiet(), profile(activities=[ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
        model = build_model(config, recipe, target_modules, "cpu", seed, planned)
        losses = train_steps(model, recipe, config["vocab_size"], steps, "cpu", seed,
                             mark=lambda step: record_function(f"{STEP_MARK}{step}"),
                             autocast=autocast, padded=padded)
    events = prof.profiler.kineto_results.events()
    peak = _peak_in_window(events, first_step=1)
    start = time.perf_counter()
    train_steps(model, recipe, config["vocab_size"], 1, "cpu", seed, autocast=autocast,
                padded=padded)
    elapsed = time.perf_counter() - start
    del model
    return Measurement(peak, recipe.batch * recipe.seq_len / elapsed, "cpu", steps, losses)


def measure_stage(pm, config: dict, recipe: Recipe, steps: int = 3, device: str = "cpu",
                  seed: int = 0, planned=None) -> Measurement:
    """Peak tensor bytes over optimizer steps 2..``steps`` of ``recipe.stage``'s own
    trainer (TRL's, built as ``autotune run`` builds it), and tokens/s.

    The rows are the stage's shipped example rows with every answer repeated past
    ``recipe.seq_len`` tokens (the trainer truncates them to it); the tokenizer is the
    byte-level one ``--random-init`` runs build. ``planned``: as for :func:`measure`.
    """
    import tempfile

    import torch

    from autotune.catalog.datasets import load_rows
    from autotune.catalog.demo import build_tokenizer, dataset_path
    from autotune.plugin.registry import family_for, stage_named
    from autotune.run.training import RunSettings, build_trainer, trainer_args

    if steps < 2:
        raise ValueError("need at least two steps: optimizer state exists from the second on")
    stage = stage_named(pm, recipe.stage)
    tokenizer = build_tokenizer(config["vocab_size"])
    tokenizer.chat_template = (planned[0] if planned else family_for(pm, config)
                               ).chat_template(config)
    config = {**config, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    rows = [_lengthened(row, 8 * recipe.seq_len) for row in load_rows(dataset_path(stage), stage)]
    plan = {"training": {"micro_batch": recipe.batch, "grad_accum": 1, "lr_scheduler": "constant",
                         "learning_rate": 1e-4}}
    cpu = not device.startswith("cuda")
    marks = _step_marks(cpu, first_step=1)
    with tempfile.TemporaryDirectory(prefix="autotune-measure-") as folder:
        args = trainer_args(plan, recipe, RunSettings(data="", output_dir=folder,
                                                      max_steps=steps, seed=seed),
                            "cpu" if cpu else "cuda", folder)
        gc.collect()  # what earlier steps left must not be freed inside the window
        with _allocations(cpu) as prof:  # the model and any reference copy counted too
            model = build_model(config, recipe, None, device, seed, planned)
            trainer = build_trainer(stage, model, tokenizer, rows, args, recipe, plan,
                                    [marks])
            trainer.train()
        if cpu:
            peak = _peak_in_window(prof.profiler.kineto_results.events(), first_step=1)
        else:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = recipe.batch * recipe.seq_len * stage.sequences_per_example() * (steps - 1)
    return Measurement(peak, tokens / marks.seconds, "cpu" if cpu else device, steps, losses,
                       None if cpu else torch.cuda.max_memory_reserved(device), stage.name)


def measure_as_run(pm, config: dict, recipe: Recipe,
                   target_modules: list[str] | str | None = None, steps: int = 3,
                   device: str = "cpu", seed: int = 0, planned=None) -> Measurement:
    """Steps as ``autotune run`` takes them: the stage's own trainer where it is TRL's
    (:func:`measure_stage`; its chunked LM head, DPO's reference forward), else the plain
    causal-LM step of :func:`measure`. ``plan --measure`` confirms its plans with this."""
    from autotune.catalog.demo import MIN_VOCAB
    from autotune.plugin.registry import stage_named

    if stage_named(pm, recipe.stage).trl_scoring and config["vocab_size"] >= MIN_VOCAB:
        return measure_stage(pm, config, recipe, steps, device, seed, planned)
    return measure(config, recipe, target_modules, steps, device, seed, planned)


def _step_marks(cpu: bool, first_step: int):
    """A trainer callback marking optimizer steps from ``first_step`` on (profiler ranges on
    the CPU, see :func:`_peak_in_window`; a reset peak on CUDA) and timing them
    (``seconds``)."""
    import torch
    from torch.profiler import record_function
    from transformers import TrainerCallback

    class StepMarks(TrainerCallback):
        seconds, started, open = 0.0, 0.0, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step and not cpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if cpu:
                self.open = record_function(f"{STEP_MARK}{state.global_step}")
                self.open.__enter__()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if not cpu:
                torch.cuda.synchronize()
            if state.global_step > first_step:  # global_step counts the step just taken
                self.seconds += time.perf_counter() - self.started
            if self.open is not None:
                self.open.__exit__(None, None, None)
                self.open = None

    return StepMarks()


@contextlib.contextmanager
def _allocations(cpu: bool):
    """On the CPU, the profiler recording every allocation (see :func:`_peak_in_window`)."""
    if not cpu:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    from autotune.util.quiet import native_stderr_quiet

    with native_stderr_quiet(), profile(activities=[ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
        yield prof


def _lengthened(row, chars: int, cut: bool = False):
    """``row`` with each answer repeated to ``chars`` characters and its prompt cut to its
    last turn's first 8 (``cut``), so that the answers, which take the loss, fill the
    sequence."""
    if isinstance(row, str):
        return row[:8] if cut else (row + " ") * (chars // (len(row) + 1) + 1)
    if isinstance(row, list):
        return [_lengthened(turn, chars, cut) for turn in (row[-1:] if cut else row)]
    if isinstance(row, dict):
        return {k: v if k == "role" else _lengthened(v, chars, cut or k == "prompt")
                for k, v in row.items()}
    return row


def _peak_in_window(events, first_step: int) -> int:
    """Largest live total of allocator events during steps ``first_step`` onwards."""
    marks = [e for e in events if e.name().startswith(STEP_MARK)
             and int(e.name()[len(STEP_MARK):]) >= first_step]
    begin = min(e.start_ns() for e in marks)
    end = max(e.start_ns() + e.duration_ns() for e in marks)
    memory = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"),
                    key=lambda item: item[0])
    live, peak = 0, 0
    for stamp, nbytes in memory:
        live += nbytes
        if begin <= stamp <= end:
            peak = max(peak, live)
    return peak


def _measure_cuda(config, recipe, target_modules, steps, device, seed,
                  planned=None, autocast=True, padded=False) -> Measurement:
    import torch

    model = build_model(config, recipe, target_modules, device, seed, planned)
    first = train_steps(model, recipe, config["vocab_size"], 1, device, seed, autocast=autocast,
                        padded=padded)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = train_steps(model, recipe, config["vocab_size"], steps - 1, device, seed,
                         autocast=autocast, padded=padded)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    tokens = recipe.batch * recipe.seq_len * (steps - 1)
    return Measurement(torch.cuda.max_memory_allocated(device), tokens / elapsed, device, steps,
                       first + losses, torch.cuda.max_memory_reserved(device))

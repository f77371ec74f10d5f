"""The learning-rate range test (fastai's / PyTorch Lightning's ``lr_find``) for a LoRA run.

A fresh adapter trains for a few dozen optimizer steps on the real model and data while the learning rate rises
exponentially (1e-6 .. 1e-1 by default); the loss is recorded at every step and the test stops once the smoothed
loss explodes. :func:`suggest_lr_range` (a pure function of the curve) turns the curve into a range to search:
around the steepest descent, below the rate where the loss was lowest and well below the explosion. The adapter
is thrown away afterwards. The test also measures what a step, an evaluation and loading the model cost, which
the tune budget needs.
"""

from __future__ import annotations

import gc
import io
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from loralab.config import RunConfig
from loralab.errors import LoralabError

LR_MIN = 1e-6
LR_MAX = 1e-1
STEPS = 50
DIVERGE = 4.0  # the loss exploded: smoothed loss above 4x the lowest smoothed loss (or non-finite)
BETA = 0.9  # smoothing of the loss while the test runs (an exponential moving average, debiased)


# ---------------------------------------------------------------- the suggestion (pure)


@dataclass
class LrSuggestion:
    """A learning-rate range to search, and the landmarks of the curve it comes from."""

    low: float
    high: float
    steepest: float | None = None  # rate of the steepest descent of the loss
    minimum: float | None = None  # rate where the (smoothed) loss was lowest
    explosion: float | None = None  # first rate where the loss exploded (None: it never did)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LrSuggestion":
        return cls(**{key: data.get(key) for key in ("low", "high", "steepest", "minimum", "explosion")},
                   note=data.get("note") or "")

    def describe(self) -> str:
        parts = [f"search {_short(self.low)} .. {_short(self.high)}"]
        if self.steepest is not None:
            parts.append(f"steepest descent at {_short(self.steepest)}")
        if self.minimum is not None:
            parts.append(f"lowest loss at {_short(self.minimum)}")
        parts.append(f"loss exploded at {_short(self.explosion)}" if self.explosion is not None
                     else "the loss did not explode")
        return "; ".join(parts) + (f" ({self.note})" if self.note else "")


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def smooth_losses(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """The debiased exponential moving average of a loss curve (what the test watches while it runs)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


def _centered(values: Sequence[float], window: int) -> list[float]:
    """A centered moving average (no lag; shrinking at the ends), for locating the descent."""
    half = max(0, window // 2)
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def suggest_lr_range(lrs: Sequence[float], losses: Sequence[float], *, diverge: float = DIVERGE, window: int = 5,
                     skip_start: int = 2, fallback: float = 3e-4) -> LrSuggestion:
    """A learning-rate range from a range test's (rate, loss) points, rates increasing.

    The curve is cut at the first non-finite loss, smoothed without lag (centered average of ``window`` points),
    and read for three landmarks: the **steepest descent** (most negative slope of the loss against log10 of the
    rate, before the lowest point), the **minimum** (rate of the lowest smoothed loss) and the **explosion** (the
    first rate after the minimum where the loss is back above where it started (after a drop of more than 2%),
    above ``diverge`` x the lowest, or non-finite). The range spans fastai's two suggestions (the steepest descent and a tenth of the minimum),
    widened 3x each way, and stays below the minimum and below half the explosion; it covers at least a decade.
    Without a descent (a flat or rising curve) it is one decade around ``fallback`` (the config's rate), noted.
    """
    if len(lrs) != len(losses):
        raise ValueError(f"{len(lrs)} learning rates but {len(losses)} losses")
    points = []
    for lr, loss in zip(lrs, losses):
        if not (math.isfinite(loss) and math.isfinite(lr) and lr > 0):
            break
        points.append((float(lr), float(loss)))
    nonfinite_at = float(lrs[len(points)]) if len(points) < len(lrs) else None  # where the loss became NaN / inf
    if len(points) < max(5, skip_start + 3):
        explosion = nonfinite_at
        top = min(fallback * 3, explosion / 10) if explosion else fallback * 3
        return LrSuggestion(low=_round(top / 10), high=_round(top), explosion=explosion,
                            note=f"too few finite points ({len(points)}) to read the curve; a decade below "
                                 f"{_short(top)}")
    rates = [p[0] for p in points]
    smooth = _centered([p[1] for p in points], window)
    logs = [math.log10(r) for r in rates]
    lowest = min(range(len(smooth)), key=smooth.__getitem__)
    best = smooth[lowest]
    start = statistics.median(p[1] for p in points[: max(3, len(points) // 10)])  # where the loss started (robust)
    explosion: float | None = nonfinite_at
    dropped = start - best > 0.02 * max(abs(start), 1e-12)  # "back above the start" means something only then
    for i in range(lowest + 1, len(smooth)):
        if (dropped and smooth[i] > start) or smooth[i] > diverge * best:
            explosion = rates[i]
            break
    # slopes of the smoothed loss against log10(lr), from skip_start to the lowest point
    slopes = []
    for i in range(max(1, skip_start), lowest + 1):
        left, right = max(0, i - 1), min(len(smooth) - 1, i + 1)
        if logs[right] > logs[left]:
            slopes.append(((smooth[right] - smooth[left]) / (logs[right] - logs[left]), i))
    descent = min(slopes) if slopes else None
    if descent is None or descent[0] >= 0 or not dropped:
        top = fallback * 3
        if explosion:
            top = min(top, explosion / 10)
        return LrSuggestion(low=_round(top / 10), high=_round(top), minimum=rates[lowest], explosion=explosion,
                            note="no clear descent of the loss; a decade around the config's learning rate")
    steepest = rates[descent[1]]
    minimum = rates[lowest]
    low = min(steepest, minimum / 10) / 3
    high = max(steepest, minimum / 10) * 3
    high = min(high, minimum)
    if explosion is not None:
        high = min(high, explosion / 2)
    if high < low * 10:  # at least a decade to search
        low = high / 10
    low = max(low, rates[0])
    return LrSuggestion(low=_round(low), high=_round(high), steepest=steepest, minimum=minimum, explosion=explosion)


def _round(value: float) -> float:
    return float(f"{value:.3g}")


# ---------------------------------------------------------------- running the test


@dataclass
class RangeTest:
    """The points of a range test, its suggestion, and what steps, evaluations and loading the model cost."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: LrSuggestion
    lr_min: float
    lr_max: float
    steps: int  # planned
    stopped: str  # "exploded at step N" or "completed"
    setup_s: float = 0.0
    step_s: float = 0.0
    eval_s: float = 0.0
    base_eval_loss: float | None = None
    base_metrics: dict[str, float] = field(default_factory=dict)  # eval_exact_match, ... (a generation metric)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["suggestion"] = self.suggestion.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RangeTest":
        data = dict(data)
        data["suggestion"] = LrSuggestion.from_dict(data["suggestion"])
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _loss(session: Any, model: Any, batch: dict[str, Any], supervised: bool) -> tuple[Any, float]:
    """The batch loss as training computes it, and its weight (supervised tokens, or examples)."""
    if supervised:
        from loralab.speed import supervised_lm_loss

        total, count = supervised_lm_loss(model, batch)
        return total / count.clamp(min=1), float(count)
    output = model(**batch)
    return output.loss, float(batch["labels"].shape[0])


def run_range_test(config: RunConfig, *, lr_min: float = LR_MIN, lr_max: float = LR_MAX, steps: int = STEPS,
                   diverge: float = DIVERGE, beta: float = BETA, generation_metric: str | None = None,
                   generate_limit: int | None = None, prepared: Any = None, clock: Callable[[], float] = time.perf_counter,
                   preflight: Callable[[Any], None] | None = None,
                   on_step: Callable[[int, float, float], None] | None = None) -> RangeTest:
    """Train a fresh adapter of ``config`` for up to ``steps`` optimizer steps, the rate rising from ``lr_min`` to
    ``lr_max`` exponentially; stop when the smoothed loss exceeds ``diverge`` x its lowest value (or is non-finite).

    One batch per step (``train.gradient_accumulation`` is not simulated), AdamW, gradients clipped at
    ``train.max_grad_norm``. Before the first step the base model (the fresh adapter changes nothing yet) is evaluated once on the eval split:
    its eval loss and, with ``generation_metric``, its generation scores on the first ``generate_limit`` eval examples,
    which also measures what an evaluation costs. ``preflight`` (loralab's fast checks) runs on the loaded session
    first. Nothing is written and the weights are not kept.
    """
    import torch
    from transformers import set_seed

    from loralab import training
    from loralab.generation import training_generation_settings
    from loralab.turns import first_answers

    if not (0 < lr_min < lr_max):
        raise LoralabError(f"the range test needs 0 < lr_min < lr_max, got {lr_min} and {lr_max}")
    if steps < 5:
        raise LoralabError(f"the range test needs at least 5 steps, got {steps}")
    set_seed(config.train.seed)
    started = clock()
    session = training.setup(config, prepared)
    if preflight is not None:
        preflight(session)
    model = session.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not config.model.quantized:
        model.to(device)
    else:
        device = next(model.parameters()).device
    setup_s = clock() - started
    supervised = training.uses_supervised_logits(session)
    model_type = training.model_type_of(model)
    autocast = lambda: training.autocast(config.train.precision, device, model_type)  # noqa: E731

    # the base model on the eval split: an evaluation's cost, the base row
    base_eval_loss, base_metrics, eval_s = None, {}, 0.0
    if session.data.eval is not None and len(session.data.eval):
        model.eval()
        began = clock()
        total = weight = 0.0
        loader = torch.utils.data.DataLoader(session.data.eval, batch_size=config.train.eval_batch_size or
                                             config.train.batch_size, collate_fn=session.collator)
        with torch.no_grad(), autocast():
            for batch in loader:
                loss, count = _loss(session, model, _to_device(batch, device), supervised)
                total += float(loss) * count
                weight += count
        base_eval_loss = total / weight if weight else None
        if generation_metric and generation_metric != "eval_loss":
            from loralab.evaluation import generation_metrics

            limit = generate_limit or config.train.eval_generate_limit
            examples = first_answers(session.data.eval_examples, limit)  # what a trial's evaluations answer
            settings = training_generation_settings(config, session.tokenizer, [e.response for e in examples])
            with autocast():
                base_metrics = generation_metrics(model, session.tokenizer, config, session.task_type, examples,
                                                  settings)
            session.tokenizer.padding_side = "right"
        eval_s = clock() - began

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr_min, weight_decay=config.train.weight_decay)
    generator = torch.Generator().manual_seed(config.train.seed)
    loader = torch.utils.data.DataLoader(session.data.train, batch_size=config.train.batch_size, shuffle=True,
                                         collate_fn=session.collator, generator=generator)
    batches = iter(loader)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    durations: list[float] = []
    stopped = "completed"
    average, best = 0.0, math.inf
    model.train()
    try:
        for step in range(steps):
            lr = lr_min * (lr_max / lr_min) ** (step / (steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            began = clock()
            with autocast():
                loss, _ = _loss(session, model, _to_device(batch, device), supervised)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            durations.append(clock() - began)
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                smoothed.append(math.inf)
                stopped = f"the loss was {value} at step {step + 1} (learning rate {lr:.2g})"
                break
            average = beta * average + (1 - beta) * value
            current = average / (1 - beta ** (step + 1))
            smoothed.append(current)
            best = min(best, current)
            if on_step is not None:
                on_step(step + 1, lr, current)
            if step >= 3 and current > diverge * best:
                stopped = f"the loss exploded at step {step + 1} (learning rate {lr:.2g})"
                break
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer, params, model, session
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    suggestion = suggest_lr_range(lrs, losses, diverge=diverge, fallback=config.train.learning_rate)
    step_s = statistics.median(durations[1:] or durations) if durations else 0.0  # the first step warms up
    return RangeTest(lrs=lrs, losses=losses, smoothed=smoothed, suggestion=suggestion, lr_min=lr_min, lr_max=lr_max,
                     steps=steps, stopped=stopped, setup_s=setup_s, step_s=step_s, eval_s=eval_s,
                     base_eval_loss=base_eval_loss, base_metrics=base_metrics)


# ---------------------------------------------------------------- the plot


def render_range_test_png(test: RangeTest, title: str = "learning-rate range test") -> bytes:
    """Loss against the learning rate (log scale): raw and smoothed, the suggested range shaded, landmarks marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    ax = figure.subplots()
    finite = [(lr, loss) for lr, loss in zip(test.lrs, test.losses) if math.isfinite(loss)]
    if finite:
        ax.plot([p[0] for p in finite], [p[1] for p in finite], color="#bbbbbb", linewidth=1, label="loss")
        smooth = _centered([p[1] for p in finite], 5)  # what the suggestion reads (the run's moving average lags)
        ax.plot([p[0] for p in finite], smooth, color="#1f77b4", linewidth=2, label="smoothed loss (5-point average)")
    s = test.suggestion
    ax.axvspan(s.low, s.high, color="#2ca02c", alpha=0.15, label=f"suggested range {s.low:.2g} .. {s.high:.2g}")
    if s.steepest is not None:
        ax.axvline(s.steepest, color="#2ca02c", linestyle="--", linewidth=1, label=f"steepest descent {s.steepest:.2g}")
    if s.explosion is not None:
        ax.axvline(s.explosion, color="#d62728", linestyle=":", linewidth=1.5, label=f"explosion {s.explosion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    if finite:  # the descent fills the plot; the explosion runs off the top
        smooth = _centered([p[1] for p in finite], 5)
        lowest = min(range(len(smooth)), key=smooth.__getitem__)
        top, low = max(p[1] for p in finite[: lowest + 1]), min(p[1] for p in finite)
        ax.set_ylim(low - 0.1 * (top - low) - 1e-3, top + 0.15 * (top - low) + 1e-3)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

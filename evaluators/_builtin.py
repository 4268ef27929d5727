"""The built-in model: a small byte-level Llama trained here, from the standard library's source.

Training is deterministic from the recipe (seed, steps, shapes, corpus file list), so the
committed weights can be re-made and a test can check that the first steps' losses reproduce.

It runs in two phases. The first learns the code. The second (``LookupPhase``) teaches looking
things up far back in the context, which the first never learned from its share of recall rows
(its accuracy on recall answers stayed at chance): rows of code with a random string written twice
teach lookup by content, recall rows teach the table format, and code rows keep the code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from budgetpress.evaluators._corpus import (
    CorpusFiles,
    list_corpus_files,
    make_copy_sequence,
    make_recall_sequence,
    read_stream,
    stream_sha256,
)
from budgetpress.evaluators._tokenizer import save_byte_tokenizer

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_model"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
LOGGED_FIRST_STEPS = 5


@dataclass(frozen=True, kw_only=True)
class LookupPhase:
    """The second phase: from the first phase's weights (rounded to bf16, as saved), batches whose
    rows cycle through code, recall and two copy rows (``ROW_KINDS``)."""

    seed: int
    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float


ROW_KINDS = ("code", "recall", "copy", "copy")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything that determines the trained weights, given the corpus files."""

    preset: str
    seed: int
    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    recall_fraction: float
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int
    heldout_max_windows: int
    lookup: LookupPhase | None = None


PRESETS: dict[str, Recipe] = {
    "full": Recipe(
        preset="full",
        seed=1234,
        steps=1800,
        batch_size=16,
        seq_len=512,
        learning_rate=2e-3,
        min_lr_ratio=0.05,
        warmup_steps=60,
        weight_decay=0.1,
        grad_clip=1.0,
        recall_fraction=0.15,
        hidden_size=256,
        intermediate_size=1024,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        head_dim=64,
        max_positions=2048,
        heldout_max_windows=1024,
        lookup=LookupPhase(
            seed=4321,
            steps=1200,
            batch_size=16,
            seq_len=256,
            learning_rate=1e-3,
            min_lr_ratio=0.1,
            warmup_steps=20,
            weight_decay=0.1,
            grad_clip=1.0,
        ),
    ),
    "micro": Recipe(
        preset="micro",
        seed=1234,
        steps=12,
        batch_size=4,
        seq_len=128,
        learning_rate=3e-3,
        min_lr_ratio=0.1,
        warmup_steps=2,
        weight_decay=0.1,
        grad_clip=1.0,
        recall_fraction=0.25,
        hidden_size=128,
        intermediate_size=256,
        n_layers=2,
        n_heads=2,
        n_kv_heads=2,
        head_dim=64,
        max_positions=512,
        heldout_max_windows=8,
        lookup=LookupPhase(
            seed=4321,
            steps=3,
            batch_size=4,
            seq_len=128,
            learning_rate=1e-3,
            min_lr_ratio=0.1,
            warmup_steps=1,
            weight_decay=0.1,
            grad_clip=1.0,
        ),
    ),
}


def model_config(recipe: Recipe) -> LlamaConfig:
    """The transformers config of the built-in architecture for a recipe."""
    return LlamaConfig(
        vocab_size=256,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attention_bias=False,
        mlp_bias=False,
    )


def build_model(recipe: Recipe) -> LlamaForCausalLM:
    """A freshly initialised model; the global RNG is forked so callers' RNG state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(model_config(recipe))
    return model.float()


class BatchSampler:
    """Random training windows of the corpus, with a share of recall sequences, from one seed."""

    def __init__(self, *, stream: np.ndarray, recipe: Recipe) -> None:
        self._stream = stream
        self._recipe = recipe
        self._rng = np.random.default_rng(recipe.seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        length = self._recipe.seq_len + 1
        rows: list[np.ndarray] = []
        for _ in range(self._recipe.batch_size):
            if self._rng.random() < self._recipe.recall_fraction:
                rows.append(make_recall_sequence(self._rng, length=length, filler=self._stream).tokens)
            else:
                start = int(self._rng.integers(0, len(self._stream) - length))
                rows.append(self._stream[start : start + length])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


class LookupSampler:
    """The lookup phase's batches: row ``i`` of each is of kind ``ROW_KINDS[i % 4]``, from one seed."""

    def __init__(self, *, stream: np.ndarray, phase: LookupPhase) -> None:
        self._stream = stream
        self._phase = phase
        self._rng = np.random.default_rng(phase.seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def _row(self, kind: str, length: int) -> np.ndarray:
        if kind == "recall":
            return make_recall_sequence(self._rng, length=length, filler=self._stream).tokens
        if kind == "copy":
            return make_copy_sequence(self._rng, length=length, filler=self._stream).tokens
        start = int(self._rng.integers(0, len(self._stream) - length))
        return self._stream[start : start + length]

    def __next__(self) -> torch.Tensor:
        length = self._phase.seq_len + 1
        rows = [self._row(ROW_KINDS[i % len(ROW_KINDS)], length) for i in range(self._phase.batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def learning_rate_at(step: int, recipe: Recipe | LookupPhase) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.learning_rate * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine)


def _make_optimizer(model: torch.nn.Module, recipe: Recipe | LookupPhase) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(0.9, 0.95), eps=1e-8)


def train_steps(
    model: LlamaForCausalLM,
    recipe: Recipe,
    stream: np.ndarray,
    *,
    n_steps: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run the first ``n_steps`` of the recipe's first phase on ``model``; returns each step's loss."""
    return _run_steps(model, recipe, BatchSampler(stream=stream, recipe=recipe), n_steps=n_steps, on_step=on_step)


def _run_steps(
    model: LlamaForCausalLM,
    schedule: Recipe | LookupPhase,
    batches: Iterator[torch.Tensor],
    *,
    n_steps: int,
    on_step: Callable[[int, float], None] | None,
) -> list[float]:
    optimizer = _make_optimizer(model, schedule)
    losses: list[float] = []
    model.train()
    for step in range(n_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, schedule)
        batch = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        losses.append(float(loss.item()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def heldout_bits_per_byte(model: LlamaForCausalLM, stream: np.ndarray, *, seq_len: int, max_windows: int) -> float:
    """Mean next-byte cross-entropy in bits over non-overlapping windows of the held-out stream."""
    model.eval()
    n_windows = min(max_windows, (len(stream) - 1) // seq_len)
    total_nats, total_bytes = 0.0, 0
    for first in range(0, n_windows, 8):
        starts = range(first * seq_len, min(n_windows, first + 8) * seq_len, seq_len)
        batch = torch.from_numpy(np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        logits = model(input_ids=batch[:, :-1]).logits.float()
        nats = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1), reduction="sum")
        total_nats += float(nats)
        total_bytes += batch[:, 1:].numel()
    return total_nats / total_bytes / math.log(2)


@torch.no_grad()
def recall_accuracy_of(model: LlamaForCausalLM, stream: np.ndarray, *, n: int = 64, length: int = 512) -> float:
    """Share of recall answer bytes the model predicts (argmax) with the whole sequence in context;
    chance is 1/36. Sequences from ``stream`` (the held-out files) with a fixed seed."""
    model.eval()
    rng = np.random.default_rng(2024)
    sequences = [make_recall_sequence(rng, length=length, filler=stream) for _ in range(n)]
    hits, total = 0, 0
    for first in range(0, n, 8):
        chunk = sequences[first : first + 8]
        tokens = torch.from_numpy(np.stack([s.tokens for s in chunk]).astype(np.int64))
        mask = torch.from_numpy(np.stack([s.answer_mask for s in chunk]))[:, 1:]
        predicted = model(input_ids=tokens[:, :-1]).logits.argmax(-1)
        hits += int((predicted[mask] == tokens[:, 1:][mask]).sum())
        total += int(mask.sum())
    return hits / total


def _weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the bf16 state dict, name by name: the same for a model as trained and as loaded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _round_to_bf16_(model: torch.nn.Module) -> None:
    """The weights as the first phase saves them, so that the lookup phase starts from the same
    weights whether the first phase ran in this process or was loaded from its checkpoint."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _corpus_record(files: CorpusFiles, train: np.ndarray, heldout: np.ndarray) -> dict[str, Any]:
    return {
        "source": "python-stdlib",
        "python_version": platform.python_version(),
        "train_files": list(files.train),
        "heldout_files": list(files.heldout),
        "train_bytes": len(train),
        "heldout_bytes": len(heldout),
        "train_sha256": stream_sha256(train),
        "heldout_sha256": stream_sha256(heldout),
    }


def train_builtin(
    *,
    preset: str,
    out_dir: Path,
    steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    first_phase_from: Path | None = None,
) -> dict[str, Any]:
    """Train a preset from scratch (or, with ``first_phase_from``, continue from the checkpoint its
    first phase wrote there) and write weights (bf16 safetensors), config and manifest.

    ``steps`` overrides the first phase's step count. ``on_step`` sees the steps of both phases,
    numbered on from one phase to the next.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; accepted: {', '.join(sorted(PRESETS))}")
    recipe = PRESETS[preset] if steps is None else replace(PRESETS[preset], steps=steps)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    files = list_corpus_files()
    train = read_stream(files.root, files.train)
    heldout = read_stream(files.root, files.heldout)
    if first_phase_from is None:
        model, first_phase = _train_first_phase(recipe, train, on_step)
    else:
        model, first_phase = _load_first_phase(recipe, first_phase_from)
    lookup = None
    if recipe.lookup is not None:
        lookup = _train_lookup_phase(model, recipe.lookup, train, heldout, first_step=recipe.steps, on_step=on_step)
    bpb = heldout_bits_per_byte(model, heldout, seq_len=recipe.seq_len, max_windows=recipe.heldout_max_windows)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "bfloat16"
    model.config.save_pretrained(out_dir)
    save_byte_tokenizer(out_dir)
    weights = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    manifest = {
        "format": MANIFEST_FORMAT,
        "recipe": asdict(recipe),
        "corpus": _corpus_record(files, train, heldout),
        "n_params": sum(t.numel() for t in weights.values()),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": file_sha256(out_dir / WEIGHTS_FILE),
        "heldout_bits_per_byte": round(bpb, 4),
        **first_phase,
        "lookup": lookup,
        "torch_version": torch.__version__,
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _phase_record(losses: list[float], seconds: float) -> dict[str, Any]:
    return {
        "first_losses": losses[:LOGGED_FIRST_STEPS],
        "final_loss_bits": round(float(np.mean(losses[-20:])) / math.log(2), 4),
        "train_seconds": round(seconds, 1),
    }


def _train_first_phase(
    recipe: Recipe, train: np.ndarray, on_step: Callable[[int, float], None] | None
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    model = build_model(recipe)
    started = time.monotonic()
    losses = train_steps(model, recipe, train, n_steps=recipe.steps, on_step=on_step)
    return model, _phase_record(losses, time.monotonic() - started)


def _first_phase_fields(recipe: Recipe | dict[str, Any]) -> dict[str, Any]:
    fields = asdict(recipe) if isinstance(recipe, Recipe) else dict(recipe)
    fields.pop("lookup", None)
    return fields


def _load_first_phase(recipe: Recipe, directory: Path) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """The first phase's model and record from a checkpoint it wrote; its recipe must be ``recipe``'s."""
    manifest = read_manifest(directory)
    if _first_phase_fields(manifest["recipe"]) != _first_phase_fields(recipe):
        raise ValueError(
            f"{directory} was not written by the first phase of preset {recipe.preset!r}: its recipe differs"
        )
    if manifest.get("lookup") is not None:
        raise ValueError(f"{directory} has been through the lookup phase already; give the first phase's checkpoint")
    model = build_model(recipe)
    weights_path = directory / manifest["weights_file"]
    model.load_state_dict({name: tensor.float() for name, tensor in load_file(str(weights_path)).items()})
    record = {k: manifest[k] for k in ("first_losses", "final_loss_bits", "train_seconds")}
    return model, record | {"first_phase_weights_sha256": file_sha256(weights_path)}


def _train_lookup_phase(
    model: LlamaForCausalLM,
    phase: LookupPhase,
    train: np.ndarray,
    heldout: np.ndarray,
    *,
    first_step: int,
    on_step: Callable[[int, float], None] | None,
) -> dict[str, Any]:
    _round_to_bf16_(model)
    record: dict[str, Any] = {
        "from_weights_digest": _weights_digest(model),
        "recall_accuracy_before": round(recall_accuracy_of(model, heldout), 4),
    }

    def numbered(step: int, loss: float) -> None:
        if on_step is not None:
            on_step(first_step + step, loss)

    started = time.monotonic()
    batches = LookupSampler(stream=train, phase=phase)
    losses = _run_steps(model, phase, batches, n_steps=phase.steps, on_step=numbered)
    record |= _phase_record(losses, time.monotonic() - started)
    record["recall_accuracy"] = round(recall_accuracy_of(model, heldout), 4)
    return record


def read_manifest(model_dir: Path = BUILTIN_DIR) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((model_dir / MANIFEST_FILE).read_text())
    return manifest

"""Online speculative decoding (OSD): the draft model keeps learning from the target on the traffic it serves.

Liu, Hu, Bailis, Cheung, Deng, Stoica, Zhang, "Online Speculative Decoding", ICML 2024 (arXiv 2310.07177); reference
code LiuXiaoxuanPKU/OSD (`distill/train.py`: `kl_method="forward"` by default, so `loss=fkl` is the default here).

- **Drafting** is `sd`'s (a `DraftModelDrafter` subclass). A request drafts, from its first round to its last, with
  the adapted drafter that was complete when it started (picked in `prefill`), and every q handed to the verifier is
  the law its token was drawn from: the output is the target's whatever an update did (greedy: AR's tokens).
- **Buffer** (the paper's replay buffer Q): through the engine's one generic hook (`Drafter.wants_target_logits`
  -> `learn`), each round's raw target logits. Kept: the position of the round's first rejection
  (`positions=rejected`, the paper's choice) or every verified position whose context was committed
  (`positions=all`), each as (its context, a committed prefix of the request, by reference, never copied per
  position; the target's `teacher_top_k` most likely tokens there with their probabilities at temperature 1).
  Raw logits, not the sampling transform's p: under greedy p is one-hot, and the drafter, sharpened by the same
  transform as the target, keeps the target's law if it matches the raw one. At most `buffer_size` positions.
- **Update**, every `update_every` finished requests (counted at the next request's `prefill`, the first clean
  point where no generation of this drafter is mid-round in the sequential engine): `steps` AdamW steps of LoRA
  (rank `lora_rank`, alpha 2·rank, every linear layer of the blocks: peft's "all-linear") on an fp32 torch copy of
  the drafter, each step one pass over the buffered positions (one teacher-forced forward per request, logits only
  at its buffered positions). `train_layers=N` puts the adapters on the last N blocks only: the residual stream at
  their input is computed once per update without gradients, and each step runs (and back-propagates through)
  those N blocks alone, so a step costs about N/L of a full one (L blocks). Loss: forward KL(p‖q_θ) on the teacher's top-k renormalised (`fkl`), or JSD(p, q_θ)
  with β = ½ (`jsd`).
- **Threading / swap**: the update runs on a background thread (`background=False` runs it inline in the prefill
  of the request that triggers it: deterministic, for tests). When it finished, the LoRA weights are merged into a
  fresh copy that is converted to the drafter's own backend (e.g. fast-int4) and published with one reference
  assignment; requests that start after that draft with it. Any exception, or `interrupt()`, restores the LoRA
  weights from before the update, puts the positions back into the buffer and publishes nothing: the previous
  drafter stays in use. The target is never touched (its logits only arrive through the hook).
- **Checkpoints**: each successful update writes `checkpoint_dir/vNNNN/` (`adapter_model.safetensors`,
  `adapter_config.json` (peft's), `manifest.json` last) into a hidden temporary folder renamed into place in one
  step, so a reader never sees a half checkpoint; `version=N` / `version=latest` drafts with a saved version
  (reloaded onto the same base), `version=0` with the unadapted drafter. Default folder:
  `$VERISPEC_HOME/osd/<drafter name>`; `checkpoint_dir=none` keeps versions in memory only.
- **State across requests**: `verispec.generate` builds a drafter per request, so what must outlive one (buffer,
  counters, the training copy, the adapted drafter) is an `OnlineState` kept per draft-model object
  (`state_for`), in a weak-keyed table: nothing is stored on the model (a deepcopy of it stays plain).

The training copy: a deepcopy of the drafter when it runs on the torch backend; otherwise a fresh fp32 load of
`train_source`, or of the folder / registry model the drafter was loaded from (the converted backends drop their
dense weights).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from verispec.cache import CachedLM
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.validate import check_int

LOSSES = ("fkl", "jsd")
POSITIONS = ("rejected", "all")
MANIFEST, ADAPTER = "manifest.json", "adapter_model.safetensors"
FORMAT = "verispec-osd/1"
BATCH_TOKENS = 1024  # padded tokens per training forward: its activations are kept for backward (~3 GB on a 0.5B)


class UpdateInterrupted(Exception):
    """Raised inside an update that `OnlineState.interrupt` stopped."""


@dataclass(frozen=True)
class OnlineConfig:
    """The options that shape one OnlineState (requests with the same drafter object and config share it)."""

    update_every: int = 8  # the reference code's default interval is 1 request; 8 keeps a CPU update affordable
    loss: str = "fkl"
    positions: str = "rejected"
    lr: float = 1e-4  # LoRA + AdamW; 1e-3 made the 0.5B drafter worse after one step (paper: 1e-5, full weights)
    steps: int = 4
    lora_rank: int = 8
    train_layers: int = 0  # 0: LoRA on every block; N: on the last N blocks only (cheaper: see the module docstring)
    teacher_top_k: int = 32
    buffer_size: int = 4096
    checkpoint_dir: str | None = None  # None: in memory only
    background: bool = True
    train_source: str | None = None

    def __post_init__(self):
        check_int("update_every", self.update_every, 1)
        check_int("steps", self.steps, 1)
        check_int("lora_rank", self.lora_rank, 1)
        check_int("train_layers", self.train_layers, 0)
        check_int("teacher_top_k", self.teacher_top_k, 1)
        check_int("buffer_size", self.buffer_size, 1)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a number in (0, 1), got {self.lr!r}")


@dataclass
class Episode:
    """One request's committed tokens (replaced, not mutated, as rounds commit: a prefix once seen stays valid)."""

    tokens: list[int]


@dataclass
class Sample:
    """One buffered position: the context is episode.tokens[:position]; the teacher's top-k there."""

    episode: Episode
    position: int
    ids: torch.Tensor  # (k,) token ids
    p: torch.Tensor  # (k,) the target's probabilities of those ids (temperature 1)


@dataclass
class UpdateRecord:
    """One update attempt, successful or not (`OnlineState.history`)."""

    status: str  # "ok", "failed", "interrupted"
    version: int | None
    parent: int
    positions: int
    requests: int
    steps: int
    seconds: float
    loss_before: float | None = None
    loss_after: float | None = None
    error: str | None = None


def distill_loss(logits: torch.Tensor, ids: torch.Tensor, p: torch.Tensor, kind: str = "fkl") -> torch.Tensor:
    """Mean distance between the teacher's top-k law (ids, p: (n, k)) and the student's softmax(logits) (n, V).

    fkl: KL(p‖q_θ) = Σ p (log p − log q_θ) over the teacher's (renormalised) top-k: the paper's forward KL,
    mean-seeking, so the drafter puts mass where the target does (what acceptance min(1, p/q) rewards).
    jsd: ½ KL(p‖m) + ½ KL(q_θ‖m), m = (p + q_θ)/2, p dense and zero off its top-k."""
    log_q = torch.log_softmax(logits.float(), -1)  # (n, V) the student
    p = p / p.sum(-1, keepdim=True)  # (n, k) the top-k renormalised to a law
    log_p = p.clamp_min(1e-30).log()  # (n, k) finite where p underflows (those terms are 0·finite)
    if kind == "fkl":
        return (p * (log_p - log_q.gather(-1, ids))).sum(-1).mean()
    P = torch.zeros_like(log_q).scatter_(-1, ids, p)  # (n, V) dense teacher
    log_P = torch.where(P > 0, P.clamp_min(1e-30).log(), -math.inf)  # (n, V)
    log_m = torch.logaddexp(log_P, log_q) - math.log(2.0)  # (n, V) log of the mixture
    kl_pm = (P * (P.clamp_min(1e-30).log() - log_m)).sum(-1)  # (n,)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)  # (n,)
    return (0.5 * kl_pm + 0.5 * kl_qm).mean()


# -- checkpoints -----------------------------------------------------------------------------------------------

def versions(root: str | Path) -> list[int]:
    """The complete versions in a checkpoint folder (a folder counts once its manifest is there), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = re.fullmatch(r"v(\d{4,})", d.name)
        if m and (d / MANIFEST).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def version_dir(root: str | Path, version: int) -> Path:
    return Path(root) / f"v{version:04d}"


def read_manifest(root: str | Path, version: int) -> dict:
    path = version_dir(root, version) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no complete OSD checkpoint v{version:04d} in {root} (no {MANIFEST})")
    return json.loads(path.read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _describe_model(model: torch.nn.Module) -> dict:
    """What a checkpoint must be reloaded onto: the base drafter's shape."""
    from verispec.cache import output_width

    c = model.config
    return {"model_type": getattr(c, "model_type", None), "vocab_size": output_width(model),
            "hidden_size": getattr(c, "hidden_size", None), "layers": getattr(c, "num_hidden_layers", None)}


# -- the shared state ------------------------------------------------------------------------------------------

class OnlineState:
    """Buffer, counters, the LoRA training copy and the published drafter of one draft model (shared by the
    per-request OnlineDrafters). `current` is (version, model or None = the unadapted drafter), replaced in one
    assignment; requests read it once, at prefill."""

    def __init__(self, config: OnlineConfig, name: str, backend: str, base_info: dict):
        self.config = config
        self.name = name
        self.backend = backend  # the drafter's own backend: adapted copies are converted to it
        self.base_info = base_info
        self.current: tuple[int, torch.nn.Module | None] = (0, None)
        self.history: list[UpdateRecord] = []
        self.last_error: BaseException | None = None
        self.requests = 0  # requests started
        self._launched_at = 0  # finished requests when the last update was launched
        self._lock = threading.Lock()
        self._buffer: deque[Sample] = deque(maxlen=config.buffer_size)
        self._thread: threading.Thread | None = None
        self._running = False  # an update is running (on the thread, or inline)
        self._stop = threading.Event()
        self._peft = None  # the fp32 torch copy with LoRA adapters, built at the first update
        self._memory_version = 0

    # what the drafters call
    def start_request(self, original: torch.nn.Module, learning: bool) -> tuple[int, torch.nn.Module | None]:
        """A request starts: launch an update when one is due, then return the drafter it must use (an update
        launched now is published for later requests)."""
        with self._lock:
            self.requests += 1
            finished = self.requests - 1
            due = learning and finished - self._launched_at >= self.config.update_every and self._buffer
        if due:
            self.update(original, wait=not self.config.background)
        return self.current

    def record(self, samples: list[Sample]) -> None:
        with self._lock:
            self._buffer.extend(samples)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def busy(self) -> bool:
        return self._running

    # control
    def update(self, original: torch.nn.Module, wait: bool = False) -> bool:
        """Start an update on everything buffered now (unless one is running or nothing is buffered); wait=True
        runs it here and returns when it ended. Returns whether one was started."""
        with self._lock:  # one update at a time, whoever asks
            if self._running or not self._buffer:
                return False
            self._running = True
            samples = list(self._buffer)
            self._buffer.clear()
            self._launched_at = self.requests - 1 if self.requests else 0
            requests = self.requests
            if not wait:
                self._thread = threading.Thread(target=self._run, args=(original, samples, requests),
                                                name=f"verispec-osd-{self.name}", daemon=True)
                self._thread.start()
        if wait:
            self._run(original, samples, requests)
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Until the running update (if any) ended."""
        t = self._thread
        if t is not None:
            t.join(timeout)

    def interrupt(self, timeout: float | None = None) -> None:
        """Stop the running update (if any) at its next check; the previous drafter stays in use."""
        self._stop.set()
        try:
            self.wait(timeout)
        finally:
            self._stop.clear()

    def load_version(self, original: torch.nn.Module, version: int | str = "latest") -> int:
        """Draft (and continue learning) from a saved version: its adapter loaded onto a fresh training copy,
        merged and published. Returns the version."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        root = self.config.checkpoint_dir
        if root is None:
            raise ValueError("version= needs a checkpoint_dir (this state keeps versions in memory only)")
        if version == "latest":
            have = versions(root)
            if not have:
                raise FileNotFoundError(f"no complete OSD checkpoint in {root}")
            version = have[-1]
        version = check_int("version", version, 1)
        manifest = read_manifest(root, version)
        saved_layers = manifest["lora"].get("train_layers", 0)
        if (manifest.get("base") != self.base_info or manifest["lora"]["r"] != self.config.lora_rank
                or saved_layers != self.config.train_layers):
            raise ValueError(f"checkpoint v{version:04d} was trained on another drafter, LoRA rank or set of blocks "
                             f"({manifest.get('base')}, r={manifest['lora']['r']}, train_layers={saved_layers}); "
                             f"this drafter is {self.base_info}, lora_rank={self.config.lora_rank}, "
                             f"train_layers={self.config.train_layers}")
        self.wait()
        with torch.inference_mode(False):
            peft_model = self._training_copy(original)
            set_peft_model_state_dict(peft_model, load_file(str(version_dir(root, version) / ADAPTER)))
            self.current = (version, self._drafting_copy(peft_model))
        return version

    # the update
    def _check(self) -> None:
        if self._stop.is_set():
            raise UpdateInterrupted("interrupted")

    @torch.inference_mode(False)  # the engine may run under inference mode: its tensors cannot be trained
    def _training_copy(self, original: torch.nn.Module):
        if self._peft is None:
            from peft import LoraConfig, get_peft_model

            base = fp32_copy(original, self.config.train_source, self.name)
            base.eval()  # no dropout anywhere: the same forward as drafting, with gradients
            base.requires_grad_(False)
            r = self.config.lora_rank
            with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
                warnings.simplefilter("ignore", FutureWarning)
                self._peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none",
                                                             target_modules=self._targets(base)))
        return self._peft

    def _targets(self, base: torch.nn.Module):
        """peft's target_modules: every linear of the blocks, or (train_layers=N) those of the last N blocks."""
        N = self.config.train_layers
        if N == 0:
            return "all-linear"
        layers = base.get_decoder().layers
        L = len(layers)
        if N >= L:
            raise ValueError(f"osd: train_layers={N} must be below the drafter's {L} blocks (0 trains them all)")
        if len(set(getattr(base.config, "layer_types", None) or ["full"])) > 1:
            raise ValueError("osd: train_layers needs blocks of one attention type (this model mixes them)")
        blocks = "|".join(str(i) for i in range(L - N, L))
        return rf".*\.layers\.({blocks})\.(self_attn|mlp)\.\w+_proj"

    def _drafting_copy(self, peft_model) -> torch.nn.Module:
        """The LoRA weights merged into a copy of the base, on the drafter's own backend (the training copy and its
        adapters stay as they are for the next update)."""
        from verispec.backends import apply_backend

        merged = copy.deepcopy(peft_model).merge_and_unload()
        merged.eval()
        merged.requires_grad_(False)
        apply_backend(merged, self.backend)
        return merged

    def _batches(self, samples: list[Sample]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor]]:
        """The buffered positions as teacher-forced batches: requests right-padded to one length (causal attention:
        padding after a position never reaches it), at most BATCH_TOKENS tokens a forward. Each batch is
        (x (B, T), row (n,), col (n,), ids (n, k), p (n, k)): position j of row b is read at column j − 1."""
        by: dict[int, list[Sample]] = {}
        for s in samples:
            by.setdefault(id(s.episode), []).append(s)
        seqs = sorted(by.values(), key=lambda g: max(s.position for s in g))
        out, chunk = [], []
        for g in seqs + [None]:
            T = max(s.position for s in g) if g is not None else 0
            if chunk and (g is None or (len(chunk) + 1) * T > BATCH_TOKENS):
                L = max(s.position for s in chunk[-1])
                x = torch.zeros(len(chunk), L, dtype=torch.long)  # (B, L) pad id 0, never read
                rows, cols, ids, p = [], [], [], []
                for b, grp in enumerate(chunk):
                    ctx = grp[0].episode.tokens[:max(s.position for s in grp)]
                    x[b, : len(ctx)] = torch.tensor(ctx)
                    for s in grp:
                        rows.append(b)
                        cols.append(s.position - 1)
                        ids.append(s.ids)
                        p.append(s.p)
                out.append((x, torch.tensor(rows), torch.tensor(cols), torch.stack(ids), torch.stack(p)))
                chunk = []
            if g is not None:
                chunk.append(g)
        return out

    def _entry_states(self, model, batches) -> list[torch.Tensor | None]:
        """train_layers=N: per batch, the residual stream entering block L − N (no gradients: nothing below it
        trains), so that every step runs the last N blocks only. Otherwise Nones."""
        N = self.config.train_layers
        if N == 0:
            return [None] * len(batches)
        dec = model.get_base_model().get_decoder()
        with torch.no_grad():  # (B, T, H) each: hidden_states[i] is the input of block i
            return [dec(input_ids=b[0], use_cache=False, output_hidden_states=True).hidden_states[len(dec.layers) - N]
                    for b in batches]

    def _batch_loss(self, model, batch, entry: torch.Tensor | None = None) -> torch.Tensor:
        """Σ over the batch's positions of the distance (a sum, so batches add up to the buffer's total)."""
        x, rows, cols, ids, p = batch
        hf = model.get_base_model()
        dec = hf.get_decoder()
        if entry is None:
            h = dec(input_ids=x, use_cache=False).last_hidden_state  # (B, L, H)
        else:  # the last N blocks on the stored entry states: the decoder's own forward over a shorter block list
            full = dec.layers
            dec.layers = torch.nn.ModuleList(list(full)[len(full) - self.config.train_layers:])
            try:
                h = dec(inputs_embeds=entry, use_cache=False).last_hidden_state  # (B, L, H)
            finally:
                dec.layers = full
        logits = hf.get_output_embeddings()(h[rows, cols])  # (n, V): the output layer only where it is read
        return distill_loss(logits[:, : self.base_info["vocab_size"]], ids, p, self.config.loss) * len(rows)

    def _loss(self, model, batches, n: int, entries) -> float:
        with torch.no_grad():
            return sum(float(self._batch_loss(model, b, e)) for b, e in zip(batches, entries)) / n

    def _step(self, model, opt, params, batches, n: int, entries) -> None:
        """One optimiser step: the mean loss over every buffered position (gradients accumulated batch by batch)."""
        opt.zero_grad(set_to_none=True)
        for b, e in zip(batches, entries):
            self._check()
            (self._batch_loss(model, b, e) / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def _run(self, original: torch.nn.Module, samples: list[Sample], requests: int) -> None:
        t0 = time.perf_counter()
        parent = self.current[0]
        rec = UpdateRecord("failed", None, parent, len(samples), requests, 0, 0.0)
        snapshot = None
        try:
            with torch.inference_mode(False), torch.enable_grad():
                model = self._training_copy(original)
                params = [q for q in model.parameters() if q.requires_grad]
                snapshot = [q.detach().clone() for q in params]  # LoRA weights before: restored on any failure
                batches = self._batches(samples)
                n = len(samples)
                entries = self._entry_states(model, batches)
                rec.loss_before = self._loss(model, batches, n, entries)
                opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0)
                for _ in range(self.config.steps):
                    self._check()
                    self._step(model, opt, params, batches, n, entries)
                    rec.steps += 1
                rec.loss_after = self._loss(model, batches, n, entries)
                self._check()
                merged = self._drafting_copy(model)
                self._check()  # after this point nothing is abandoned: the checkpoint and the swap go together
                rec.seconds = time.perf_counter() - t0
                version = self._publish_checkpoint(model, rec)
            rec.status, rec.version = "ok", version
            self.current = (version, merged)  # the swap: one reference assignment
        except BaseException as e:  # a failed or interrupted update changes nothing that drafts
            rec.status = "interrupted" if isinstance(e, UpdateInterrupted) else "failed"
            rec.error = f"{type(e).__name__}: {e}"
            self.last_error = e
            if snapshot is not None:
                with torch.no_grad():
                    for q, s in zip(params, snapshot):
                        q.copy_(s)
            with self._lock:  # the positions go back (oldest first), for the next update
                keep = list(self._buffer)
                self._buffer.clear()
                self._buffer.extend(samples + keep)
            if not isinstance(e, Exception):
                raise
        finally:
            rec.seconds = time.perf_counter() - t0
            self.history.append(rec)
            self._running = False

    def _publish_checkpoint(self, peft_model, rec: UpdateRecord) -> int:
        """Write the adapter as the next version; returns it. Files go to a hidden temporary folder, the manifest
        last, then one rename publishes the folder (another writer taking the same number makes us take the next)."""
        root = self.config.checkpoint_dir
        if root is None:
            self._memory_version += 1
            return max(self._memory_version, self.current[0] + 1)
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        import verispec

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()},
                      str(tmp / ADAPTER))
            peft_model.peft_config["default"].save_pretrained(str(tmp))
            lora = peft_model.peft_config["default"]
            while True:
                version = (versions(root) or [0])[-1] + 1
                manifest = {"format": FORMAT, "version": version, "parent": rec.parent, "drafter": self.name,
                            "base": self.base_info, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "lora": {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                                     "target_modules": lora.target_modules if isinstance(lora.target_modules, str)
                                     else sorted(lora.target_modules), "train_layers": self.config.train_layers},
                            "training": {**{k: v for k, v in asdict(self.config).items() if k != "checkpoint_dir"},
                                         "positions_used": rec.positions, "requests_seen": rec.requests,
                                         "steps_done": rec.steps, "seconds": rec.seconds,
                                         "loss_before": rec.loss_before, "loss_after": rec.loss_after},
                            "files": {f.name: _sha256(f) for f in sorted(tmp.iterdir())},
                            "verispec": verispec.__version__}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written last: the folder is complete
                for f in tmp.iterdir():
                    f.chmod(0o644)
                tmp.chmod(0o755)  # mkdtemp's folder is private; a published version is readable like the rest
                try:
                    os.rename(tmp, version_dir(root, version))
                    return version
                except OSError:
                    if not version_dir(root, version).exists():
                        raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def fp32_copy(model: torch.nn.Module, source: str | None, name: str) -> torch.nn.Module:
    """An fp32 torch copy of the drafter to train: `source` when given; the model itself (deep-copied) on the torch
    backend; else reloaded from the registry model or folder it came from (converted backends drop the dense
    weights, so they cannot be trained)."""
    from verispec.backends import backend_of
    from verispec.models.load import load_model

    if source is not None:
        return load_model(str(source), backend="torch", auto_pull=False).model
    if backend_of(model) == "torch":
        return copy.deepcopy(model)
    from verispec.models.registry import REGISTRY

    if name in REGISTRY:
        return load_model(name, backend="torch", auto_pull=False).model
    path = getattr(model.config, "_name_or_path", "") or ""
    if path and Path(path).is_dir():
        return load_model(path, backend="torch").model
    raise ValueError(f"osd: the drafter {name!r} runs on a converted backend and was not loaded from a folder "
                     f"verispec can reload in fp32; pass train_source=FOLDER (its fp32 HF weights)")


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def state_for(model: torch.nn.Module, name: str, config: OnlineConfig) -> OnlineState:
    """The OnlineState of this draft-model object and config (made on first use)."""
    from verispec.backends import backend_of

    table = _STATES.setdefault(model, {})
    if config not in table:
        table[config] = OnlineState(config, name, backend_of(model), _describe_model(model))
    return table[config]


def default_checkpoint_dir(name: str) -> Path:
    from verispec.home import cache_root

    return cache_root() / "osd" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# -- the drafter -----------------------------------------------------------------------------------------------

class OnlineDrafter(DraftModelDrafter):
    name = "online"

    def __init__(self, model: torch.nn.Module, vocab_size: int, stop_ids: frozenset[int], state: OnlineState,
                 learn: bool = True, version: int | str | None = None):
        super().__init__(model, vocab_size, stop_ids)
        self.original = model
        self.vocab_size = vocab_size
        self.state = state
        self.version = version
        self.wants_target_logits = learn  # the engine's hook: target logits every round, only while learning
        self.episode: Episode | None = None
        self._n = 0  # committed tokens before the current round
        self._rows: list[tuple[int, torch.Tensor]] = []  # (row i, target logits (V,)) kept by learn()
        self.used_version = 0

    @classmethod
    def from_ctx(cls, ctx) -> "OnlineDrafter":
        o = dict(ctx.options)
        learn = bool(o.pop("learn", True))
        version = o.pop("version", None)
        if version not in (None, "latest"):
            version = check_int("version", version, 0)
        if version == 0 and learn:
            raise ValueError("osd: version=0 drafts with the unadapted drafter and does not learn; add learn=False")
        ckpt = o.pop("checkpoint_dir", None)
        if ckpt is None:
            ckpt = default_checkpoint_dir(ctx.drafter.name)
        ckpt = None if str(ckpt).lower() == "none" else str(Path(ckpt).expanduser().resolve())
        config = OnlineConfig(checkpoint_dir=ckpt, **o)
        L = getattr(ctx.drafter.model.config, "num_hidden_layers", None)
        if config.train_layers and L is not None and config.train_layers >= L:
            raise ValueError(f"osd: train_layers={config.train_layers} must be below the drafter's {L} blocks "
                             "(0 trains them all)")
        state = state_for(ctx.drafter.model, ctx.drafter.name, config)
        return cls(ctx.drafter.model, ctx.target.vocab_size, ctx.stop_ids, state, learn, version)

    def prefill(self, tokens):
        if self.version == 0:
            version, model = 0, None
        else:
            if self.version is not None:
                self._resume()
            version, model = self.state.start_request(self.original, self.wants_target_logits)
        model = self.original if model is None else model
        if self.lm.model is not model:  # a published update: this request drafts with it from the first round
            self.lm = CachedLM(model, self.vocab_size, lean=True)
        self.used_version = version
        if self.wants_target_logits:
            self.episode = Episode(list(tokens))
        self._n = len(tokens)
        super().prefill(tokens)

    def _resume(self) -> None:
        """version=N / latest: with learn=False a pin (reloaded whenever the state drafts another version); while
        learning, the starting point of a state that has not served a request yet."""
        if self.wants_target_logits and self.state.requests:
            return
        want = self.version
        if want == "latest":
            root = self.state.config.checkpoint_dir
            have = versions(root) if root is not None else []
            if not have:
                raise FileNotFoundError(f"osd: version=latest, but there is no complete checkpoint in {root}")
            want = have[-1]
        if want != self.state.current[0]:
            self.state.load_version(self.original, want)

    def learn(self, draft, logits, result):
        """Keep the rows whose context is committed: the first rejection (positions=rejected) or rows 0..accepted
        (positions=all; a bonus round's rows are all verified). Positions are resolved at commit."""
        if not draft.tokens or not draft.is_chain:
            return
        if self.state.config.positions == "all":
            rows = range(result.accepted + 1)
        else:
            rows = [result.accepted] if result.kind == "recovered" else []
        self._rows = [(i, logits[i]) for i in rows]  # (V,) each

    def commit(self, tokens, draft, result):
        super().commit(tokens, draft, result)
        if self._rows:
            k = min(self.state.config.teacher_top_k, self.vocab_size)
            samples = []
            for i, row in self._rows:
                j = self._n + i  # the row predicts tokens[j] from tokens[:j]
                if j < len(tokens):  # reached (a stop token or the budget may cut the round short)
                    p, ids = torch.softmax(row.float(), -1).topk(k)  # (k,) each: the teacher at temperature 1
                    samples.append(Sample(self.episode, j, ids, p))
            if samples:
                self.episode.tokens = list(tokens)  # replaced, not mutated: an update reading the old list is fine
                self.state.record(samples)
            self._rows = []
        self._n = len(tokens)

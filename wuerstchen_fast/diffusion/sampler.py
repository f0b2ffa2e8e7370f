"""The reverse-diffusion loop shared by Stage C and Stage B.

One step = denoiser call (batch doubled to [cond, uncond] when guidance is on) -> classifier-free
guidance `lerp(ε_uncond, ε_cond, w)` -> `ddpm_step`. The last two (and the model's output head, when
the model exposes it as `eps_head` + `forward_raw`, as StageC and StageB do) run as one registered
op, `ops.ddpm_step`: one Triton kernel on the GPU, the bit-exact reference on the `torch` backend.
The loop is written for CUDA graphs and torch.compile: every shape is fixed for the whole chain,
the t values are precomputed tensors on the device (indexing one is a view, not a copy to the host),
the step takes tensors only, and the only per-step work outside the step is drawing the noise from
the generator (in the same order and shape as diffusers, so seeds reproduce its images).
`compile=True` compiles the step (once per input signature, never a recompile); `cuda_graphs=True`
captures it once per chain shape and replays it.
"""
from __future__ import annotations

import types
from typing import Callable, Sequence

import torch

from .. import ops
from ..ops.reference.ddpm import cfg_combine
from .schedule import S_OFFSET, _constants

__all__ = ["DenoiseLoop", "cfg_combine", "draw_noise"]

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def draw_noise(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise drawn the way diffusers' `randn_tensor` draws it.

    A generator on the CPU draws on the CPU and the result moves to `device`; a list of generators
    draws one batch element from each, in order.
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            parts = [draw_noise((1,) + shape[1:], g, device, dtype) for g in generator]
            return torch.cat(parts, dim=0)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _own_frame(method: Callable) -> Callable:
    """`method` bound to a copy of its function with a new code object (dynamo's cache key)."""
    f = method.__func__
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(g, method.__self__)


class _GraphedStep:
    """Captures a step function in a CUDA graph per input signature and replays it.

    Inputs are copied into static buffers (device-to-device, no host sync), the graph is replayed
    and the static output is cloned so the caller may keep it across replays.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((a.shape, a.dtype, a.device) for a in args)
        if key not in self.graphs:
            static_in = [a.clone() for a in args]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (allocator, lazy init, autotune)
                for _ in range(2):
                    self.fn(*static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(*static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        for buf, a in zip(static_in, args):
            if buf.data_ptr() != a.data_ptr():
                buf.copy_(a)
        graph.replay()
        return static_out.clone()


class DenoiseLoop:
    """Runs one stage's chain: `x` from t = timesteps[0] down to timesteps[-1].

    `model(x, r, *conds) -> ε̂` is the denoiser (Stage C: conds = (text,), Stage B: conds =
    (effnet, text)). With `guidance_scale > 1` the conds must already be batched [cond, uncond]
    (twice the batch of `x`); the loop doubles `x` and r itself.

    A model with `eps_head` ("stage_c" / "stage_b") and `forward_raw(x, r, *conds)` (the output
    before its head) has the head fused into the step op; `forward_raw` is then called directly
    (module hooks on `forward` do not run). Any other callable is treated as returning ε̂.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        guidance_scale: float = 0.0,
        *,
        s: float = S_OFFSET,
        scaler: float = 1.0,
        compile: bool | str = False,
        cuda_graphs: bool = False,
    ):
        self.model = model
        head, raw = getattr(model, "eps_head", None), getattr(model, "forward_raw", None)
        self._head = head if isinstance(head, str) and callable(raw) else "eps"
        self._denoise = raw if self._head != "eps" else model
        self.guidance_scale = float(guidance_scale)
        self.do_cfg = self.guidance_scale > 1
        self.s = s
        self.scaler = scaler
        _constants(float(s))  # fill the schedule constants now, outside any compiled region
        self._step: Callable[..., torch.Tensor] = self.step
        self._compiled: dict[tuple, Callable[..., torch.Tensor]] = {}
        self._compile = compile  # True (inductor) or the name of a torch.compile backend
        if compile:
            self._step = self._compiled_step
        if cuda_graphs:
            self._step = _GraphedStep(self._step)

    def _compiled_step(self, *args: torch.Tensor) -> torch.Tensor:
        """The step compiled once per input signature, each in a frame of its own.

        torch.compile caches compiled code, and counts recompiles against its limit of 8, per *code
        object*. Compiling `self.step` directly would make every loop (prior and decoder, each
        guidance) and every resolution a recompile of the one `DenoiseLoop.step`; a long-lived
        pipeline then passes the limit and silently runs eager. One fresh code object per loop and
        signature means one compile each and no recompiles (tests/test_compile_models.py holds that
        with error_on_recompile).
        """
        key = tuple((a.shape, a.dtype, a.device) for a in args)
        fn = self._compiled.get(key)
        if fn is None:
            backend = self._compile if isinstance(self._compile, str) else "inductor"
            fn = self._compiled[key] = torch.compile(_own_frame(self.step), dynamic=False, backend=backend)
        return fn(*args)

    def step(
        self, x: torch.Tensor, r: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, noise: torch.Tensor, *conds
    ) -> torch.Tensor:
        """One denoising step; tensors in, tensor out, no host synchronization."""
        r = r.expand(x.shape[0])
        if self.do_cfg:
            out = self._denoise(torch.cat([x, x]), torch.cat([r, r]), *conds)
        else:
            out = self._denoise(x, r, *conds)
        return ops.ddpm_step(x, out, t, t_prev, noise, guidance=self.guidance_scale, head=self._head,
                             s=self.s, scaler=self.scaler)

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        conds: Sequence[torch.Tensor],
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        callback: StepCallback | None = None,
        progress: bool | dict = True,
        desc: str | None = None,
    ) -> torch.Tensor:
        """Run the chain. `timesteps`: float32 tensor of t values, model called at all but the last.

        `callback(i, t, x) -> x` runs after each step (it may replace the latents). `conds` is read
        at every step, so a callback may also replace its entries (pass a list). `progress`: a tqdm
        bar, or a dict of tqdm options for it.
        """
        device, dtype = x.device, x.dtype
        ts = timesteps.to(device=device, dtype=torch.float32)
        # The denoiser sees t in the model dtype, and the step uses that same rounded t for ᾱ(t),
        # as the reference pipelines do; t_prev stays float32. All precomputed once.
        r_all = ts[:-1].to(dtype)
        t_all = r_all.float()
        t_prev_all = ts[1:]
        n = int(ts.shape[0]) - 1
        steps = range(n)
        if progress:
            from tqdm.auto import tqdm

            options = progress if isinstance(progress, dict) else {}
            steps = tqdm(steps, **{"desc": desc, "total": n, **options})
        for i in steps:
            noise = draw_noise(x.shape, generator, device, dtype)
            x = self._step(x, r_all[i], t_all[i], t_prev_all[i], noise, *conds)
            if callback is not None:
                x = callback(i, ts[i], x)
        return x

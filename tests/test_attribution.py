"""SourceAttribution splits real torch.optim.Adam/AdamW steps exactly: the parts sum to θ_t - θ_{t-1} of
the optimizer itself, and each part equals an independent float64 Adam written here from its equations
(paper.md section 7) over per-source gradients taken with torch.autograd.grad (never p.grad)."""

import contextlib
import io
import math
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import spawn_workers
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ntkdyn.analysis.attribution import BEFORE_ATTACH, L2_WEIGHT_DECAY, SourceAttribution, UpdateParts
from ntkdyn.trainer.distributed import leave_process_group

DT = torch.float64
TOL = 1e-10  # float64: the split adds only rounding (~1e-15); anything structural is >> 1e-10
BETAS, EPS = (0.9, 0.999), 1e-8
LR_SCALES, WEIGHT_DECAYS = (1.0, 0.5), (0.1, 0.01)  # two param groups
MAX_NORMS = [math.inf, 0.3, math.inf, 0.05, math.inf, 0.2, math.inf, 0.1]  # clip on some steps only
SET_TO_NONE = [True, True, True, False, True, True, True, True]  # step 3: zero grads, not None
THREE = {"gen": ["gen"], "und": ["und"], "aux": ["aux"]}  # source → the losses it backpropagates
ONE = {"all": ["gen", "und", "aux"]}

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.body = nn.Linear(4, 6), nn.Linear(6, 6)
        self.head_gen, self.head_und, self.dormant = nn.Linear(6, 3), nn.Linear(6, 2), nn.Linear(6, 1)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().to(DT)


def param_groups(net: Net) -> list[dict]:
    shared = [*net.trunk.parameters(), *net.body.parameters(), *net.dormant.parameters()]
    heads = [*net.head_gen.parameters(), *net.head_und.parameters()]
    return [{"params": p, "weight_decay": wd} for p, wd in zip((shared, heads), WEIGHT_DECAYS, strict=True)]


def losses(net: Net, step: int, micro: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + micro)
    x, y = torch.randn(5, 4, generator=gen, dtype=DT), torch.randn(5, 3, generator=gen, dtype=DT)
    label = torch.randint(0, 2, (5,), generator=gen)
    h = torch.tanh(net.body(torch.tanh(net.trunk(x))))
    return {
        "gen": ((net.head_gen(h) - y) ** 2).mean(),
        "und": F.cross_entropy(net.head_und(h), label),
        # the dormant layer only on even steps: on odd ones its grad stays None and torch skips it
        "aux": net.dormant(h).pow(2).mean() if step % 2 == 0 else 0.1 * h.pow(2).mean(),
    }


@dataclass
class Step:
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    grads: dict[str, dict[str, torch.Tensor]]  # source → name → gradient (autograd.grad, before clipping)
    stepped: set[str]  # names with a grad at the step (torch steps exactly these)
    clip: float  # clip_grad_norm_'s coefficient, recomputed from `grads`
    lrs: dict[str, float]
    parts: UpdateParts
    denominators: dict[str, torch.Tensor]  # √v̂ + ε of this step, as the split reports it


def train(net, optimizer, split, steps, sources=THREE, *, contexts=True, read=True) -> list[Step]:
    """Two micro-batches per step; every source's loss backpropagates inside its source context. With
    ``read=False`` nothing asks for the step's parts or denominators (None, {})."""
    params = dict(net.named_parameters())
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for k in steps:
        for group, scale in zip(optimizer.param_groups, LR_SCALES, strict=True):
            group["lr"] = 0.05 * min(1.0, (k + 1) / 3) * scale  # warm-up
        optimizer.zero_grad(set_to_none=SET_TO_NONE[k])
        grads = {s: {n: torch.zeros_like(p) for n, p in params.items()} for s in sources}
        for micro in range(2):
            terms = losses(net, k, micro)
            for source, keys in sources.items():
                loss = sum(terms[key] for key in keys) / 2
                reference = torch.autograd.grad(
                    loss, list(params.values()), retain_graph=True, allow_unused=True
                )
                for name, g in zip(params, reference, strict=True):
                    if g is not None:
                        grads[source][name] += g
                with split.source(source) if contexts else contextlib.nullcontext():
                    loss.backward(retain_graph=True)
        norm = math.sqrt(sum(float(sum(grads[s][n] for s in sources).pow(2).sum()) for n in params))
        clip = min(1.0, MAX_NORMS[k] / (norm + 1e-6))
        torch.nn.utils.clip_grad_norm_(net.parameters(), MAX_NORMS[k])
        stepped = {n for n, p in params.items() if p.grad is not None}
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer.step()
        after = {n: p.detach().clone() for n, p in params.items()}
        lrs = {n: float(groups[id(p)]["lr"]) for n, p in params.items()}
        denominators = {n: split.denominator(n) for n in stepped} if read else {}
        out.append(
            Step(before, after, grads, stepped, clip, lrs, split.last_parts if read else None, denominators)
        )
    return out


class ReferenceAdam:
    """Adam / AdamW from its equations, float64, the first moment kept per source: for each parameter
    its own t, m^s, v (AMSGrad: and max v); D = 1/(√(v/(1-β2^t)) + ε) from the total gradient."""

    def __init__(self, weight_decay: dict[str, float], decoupled: bool, amsgrad: bool = False):
        self.weight_decay, self.decoupled, self.amsgrad = weight_decay, decoupled, amsgrad
        self.t: dict[str, int] = defaultdict(int)
        self.m: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self.v: dict[str, torch.Tensor] = {}
        self.v_max: dict[str, torch.Tensor] = {}

    def resume(self, optimizer, names: dict[int, str]) -> None:
        """Start from an optimizer's state: its whole first moment is the source "before_attach"."""
        for p, state in optimizer.state.items():
            n = names[id(p)]
            self.t[n], self.v[n] = int(state["step"]), state["exp_avg_sq"].clone()
            self.m[n] = {BEFORE_ATTACH: state["exp_avg"].clone()}

    def step(self, s: Step) -> dict:
        (b1, b2), parts = (
            BETAS,
            {"current": defaultdict(dict), "momentum": defaultdict(dict), "weight_decay": {}},
        )
        for n in s.stepped:
            theta, lr, wd = s.before[n], s.lrs[n], self.weight_decay[n]
            self.t[n] += 1
            t = self.t[n]
            pushed = {source: s.clip * g[n] for source, g in s.grads.items()}
            if not self.decoupled and wd:
                pushed[L2_WEIGHT_DECAY] = wd * theta
            g = sum(pushed.values())
            self.v[n] = b2 * self.v.get(n, torch.zeros_like(g)) + (1 - b2) * g * g
            if self.amsgrad:
                self.v_max[n] = torch.maximum(self.v_max.get(n, torch.zeros_like(g)), self.v[n])
            d = 1 / (torch.sqrt((self.v_max if self.amsgrad else self.v)[n] / (1 - b2**t)) + EPS)
            k = lr / (1 - b1**t)
            for source in set(self.m[n]) | set(pushed):
                m = self.m[n].get(source, torch.zeros_like(g))
                parts["momentum"][source][n] = -k * d * b1 * m
                if source in pushed:
                    parts["current"][source][n] = -k * d * (1 - b1) * pushed[source]
                self.m[n][source] = b1 * m + (1 - b1) * pushed.get(source, 0)
            parts["weight_decay"][n] = -lr * wd * theta if self.decoupled else torch.zeros_like(theta)
        return parts


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ (‖a‖ where b = 0)."""
    scale = float(b.norm())
    return float((a - b).norm()) / scale if scale else float(a.norm())


def sum_error(s: Step) -> float:
    """The parts against the real θ_t - θ_{t-1}, worst parameter."""
    total = s.parts.total()
    assert set(total) == s.stepped
    return max(relative(total[n], s.after[n] - s.before[n]) for n in s.stepped)


def parts_error(s: Step, ref: dict) -> float:
    """Every part against the reference (absent there: zero), worst part and parameter."""
    ours = {"current": s.parts.current, "momentum": s.parts.momentum}
    errors = [relative(s.parts.weight_decay[n], ref["weight_decay"][n]) for n in s.stepped]
    for kind, per_source in ours.items():
        assert set(ref[kind]) <= set(per_source), kind
        for source, per_name in per_source.items():
            assert set(per_name) == s.stepped
            for n, x in per_name.items():
                errors.append(relative(x, ref[kind][source].get(n, torch.zeros_like(x))))
    return max(errors)


def names_of(net) -> dict[int, str]:
    return {id(p): n for n, p in net.named_parameters()}


def weight_decays(net, optimizer) -> dict[str, float]:
    names = names_of(net)
    return {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


CASES = {
    "adamw": (torch.optim.AdamW, dict(foreach=False)),
    "adamw-foreach": (torch.optim.AdamW, dict(foreach=True)),
    "adamw-fused": (torch.optim.AdamW, dict(fused=True)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(amsgrad=True)),
    "adam-l2": (torch.optim.Adam, dict()),
}


@pytest.mark.parametrize("case", CASES)
def test_split_matches_torch_and_reference(case):
    kind, options = CASES[case]
    net = make_net()
    optimizer = kind(param_groups(net), betas=BETAS, eps=EPS, **options)
    split = SourceAttribution(optimizer, net.named_parameters(), sources=THREE)
    decoupled = kind is torch.optim.AdamW
    assert split.gradient_sources == (*THREE, *(() if decoupled else (L2_WEIGHT_DECAY,)))
    reference = ReferenceAdam(weight_decays(net, optimizer), decoupled, options.get("amsgrad", False))
    steps = train(net, optimizer, split, range(8))

    assert sum(s.clip < 1 for s in steps) >= 3 and sum(s.clip == 1 for s in steps) >= 3  # clip on and off
    assert "dormant.weight" not in steps[1].stepped and "dormant.weight" in steps[3].stepped  # None vs zeros
    for s in steps:
        ref = reference.step(s)
        assert sum_error(s) < TOL
        assert parts_error(s, ref) < TOL
        for n in s.stepped:
            coefficients = s.parts.coefficients[n]
            assert coefficients.clip == pytest.approx(s.clip, rel=1e-12)
            assert coefficients.lr == s.lrs[n] and coefficients.step == reference.t[n]
            current = s.parts.current["gen"][n]  # = current_scale · g^gen / denominator
            expected = coefficients.current_scale * s.grads["gen"][n] / s.denominators[n]
            assert relative(current, expected) < TOL
    # a source's current part is zero where its loss does not reach: und never touches head_gen
    assert float(steps[-1].parts.current["und"]["head_gen.weight"].abs().max()) == 0.0


def test_one_source_is_the_whole_update_but_weight_decay():
    """One source carries all of Δθ but the decay; a host trainer's backward (no context, clipped
    before the split sees it) gives the same parts, with the clip unknown."""
    runs = []
    for contexts in (True, False):
        net = make_net()
        optimizer = torch.optim.AdamW(param_groups(net), betas=BETAS, eps=EPS)
        split = SourceAttribution(optimizer, net.named_parameters(), ("all",), default_source="all")
        runs.append(train(net, optimizer, split, range(6), ONE, contexts=contexts))
    weight_decay = weight_decays(net, optimizer)
    for with_context, from_host in zip(*runs, strict=True):
        for s in (with_context, from_host):
            share = s.parts.of_source("all")
            for n in s.stepped:
                decay = -s.lrs[n] * weight_decay[n] * s.before[n]
                assert relative(share[n], s.after[n] - s.before[n] - decay) < TOL
        assert all(c.clip is None for c in from_host.parts.coefficients.values())
        for n in with_context.stepped:
            assert relative(from_host.parts.of_source("all")[n], with_context.parts.of_source("all")[n]) < TOL


def test_parts_are_the_steps_own_when_read_late():
    """The parts are formed when first read: steps whose parts nobody read still advance every m^s, and
    what happens between the step and the read (zero_grad, an edit of the weights, a scheduler changing
    lr and β1 as OneCycleLR does) does not enter them."""
    parts = []
    for read in (True, False):
        net = make_net()
        optimizer = torch.optim.AdamW(param_groups(net), betas=BETAS, eps=EPS)
        split = SourceAttribution(optimizer, net.named_parameters(), THREE)
        last = train(net, optimizer, split, range(6), read=read)[-1]
        if not read:
            optimizer.zero_grad(set_to_none=False)
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(-3.0)
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = 7 * group["lr"], (0.5, group["betas"][1])
        parts.append(last.parts if read else split.last_parts)
        assert split.last_parts is parts[-1]  # formed once
    read_at_once, read_late = parts
    for kind in ("current", "momentum"):
        for source, tensors in getattr(read_at_once, kind).items():
            late = getattr(read_late, kind)[source]
            assert tensors.keys() == late.keys()
            assert all(torch.equal(x, late[n]) for n, x in tensors.items()), (kind, source)
    assert all(torch.equal(x, read_late.weight_decay[n]) for n, x in read_at_once.weight_decay.items())
    assert read_at_once.coefficients == read_late.coefficients


def test_attach_mid_run_keeps_the_old_momentum_apart():
    net = make_net()
    optimizer = torch.optim.AdamW(param_groups(net), betas=BETAS, eps=EPS)
    names = names_of(net)
    for k in range(3):  # plain training, nothing attached
        optimizer.zero_grad()
        sum(losses(net, k, 0).values()).backward()
        optimizer.step()
    split = SourceAttribution(optimizer, net.named_parameters(), THREE)
    assert split.moment_sources == (*THREE, BEFORE_ATTACH)
    reference = ReferenceAdam(weight_decays(net, optimizer), decoupled=True)
    reference.resume(optimizer, names)
    for s in train(net, optimizer, split, range(3, 7)):
        assert BEFORE_ATTACH not in s.parts.current
        assert float(s.parts.momentum[BEFORE_ATTACH]["trunk.weight"].norm()) > 0
        assert sum_error(s) < TOL
        assert parts_error(s, reference.step(s)) < TOL


def test_state_dict_round_trip_resumes_the_split():
    def fresh():
        net = make_net()
        optimizer = torch.optim.AdamW(param_groups(net), betas=BETAS, eps=EPS)
        return net, optimizer, SourceAttribution(optimizer, net.named_parameters(), THREE)

    net, optimizer, split = fresh()
    uninterrupted = train(net, optimizer, split, range(7))

    net, optimizer, split = fresh()
    train(net, optimizer, split, range(4))  # p.grad is not saved: resume after a set_to_none step
    buffer = io.BytesIO()
    torch.save(
        {"model": net.state_dict(), "opt": optimizer.state_dict(), "split": split.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors only
    net, optimizer, split = fresh()
    net.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["opt"])
    split.load_state_dict(saved["split"])
    for a, b in zip(uninterrupted[4:], train(net, optimizer, split, range(4, 7)), strict=True):
        assert a.stepped == b.stepped
        for kind in ("current", "momentum"):
            for source, per_name in getattr(a.parts, kind).items():
                for n, x in per_name.items():
                    assert relative(getattr(b.parts, kind)[source][n], x) < 1e-14

    # the optimizer resumed without the split's state: refused at the next step, before it moves
    net, optimizer, split = fresh()
    net.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["opt"])
    with pytest.raises(RuntimeError, match="first moment of .* is not the sum of the per-source moments"):
        train(net, optimizer, split, range(4, 5))
    with pytest.raises(ValueError, match="saved sources"):
        SourceAttribution(optimizer, net.named_parameters(), ("gen", "und")).load_state_dict(saved["split"])


def test_dropped_and_skipped_gradients():
    """zero_grad without a step drops what was gathered (as torch does); a fused step that found inf
    moves nothing and gives no parts."""
    net = make_net()
    optimizer = torch.optim.AdamW(param_groups(net), betas=BETAS, eps=EPS, fused=True)
    split = SourceAttribution(optimizer, net.named_parameters(), THREE)
    reference = ReferenceAdam(weight_decays(net, optimizer), decoupled=True)
    with split.source("gen"):  # an overflow: inf and NaN gradients
        (losses(net, 0, 0)["gen"] * math.inf).backward()
    assert net.head_gen.weight.grad.isnan().any()
    with split.source("und"):  # NaN is what the last context left: gathering goes on
        losses(net, 0, 0)["und"].backward()
    optimizer.found_inf = torch.ones(())  # what GradScaler hands a fused step after an overflow
    optimizer.step()
    del optimizer.found_inf
    assert split.last_parts is None and not optimizer.state[net.trunk.weight]["step"]
    with pytest.raises(RuntimeError, match="changed outside any source context"):
        with split.source("und"):  # not zeroed since: the stale gradient is refused
            pass
    optimizer.zero_grad()
    with split.source("und"):
        losses(net, 0, 0)["und"].backward()
    for s in train(net, optimizer, split, range(3)):  # its zero_grad drops the gathered gradient
        assert sum_error(s) < TOL
        assert parts_error(s, reference.step(s)) < TOL


def test_tensor_lr_is_split_as_torch_rounds_it():
    net = make_net()
    optimizer = torch.optim.AdamW(param_groups(net), lr=torch.tensor(0.05), betas=BETAS, eps=EPS)
    split = SourceAttribution(optimizer, net.named_parameters(), THREE)
    for k in range(3):
        for group in optimizer.param_groups:
            group["lr"].fill_(0.01 * (k + 1))  # a float32 lr: torch's step size and decay round with it
        optimizer.zero_grad()
        for source, keys in THREE.items():
            with split.source(source):
                sum(losses(net, k, 0)[key] for key in keys).backward()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        optimizer.step()
        total = split.last_parts.total()
        for n, p in net.named_parameters():  # the dormant layer's grad is None on odd steps: not moved
            assert (
                relative(total[n], p.detach() - before[n]) < TOL if n in total else torch.equal(p, before[n])
            )


class Wrapper:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_refusals_name_the_problem():
    net = make_net()
    named = list(net.named_parameters())
    with pytest.raises(TypeError, match="SGD"):
        SourceAttribution(torch.optim.SGD(net.parameters(), lr=0.1), named, THREE)
    for option, match in [
        (dict(maximize=True), "maximize"),
        (dict(capturable=True), "capturable"),
        (dict(differentiable=True), "differentiable"),
        (dict(betas=(torch.tensor(0.9), torch.tensor(0.999))), "betas"),
    ]:
        with pytest.raises(ValueError, match=match):
            SourceAttribution(torch.optim.AdamW(net.parameters(), foreach=False, **option), named, THREE)
    optimizer = torch.optim.AdamW(net.parameters())
    with pytest.raises(ValueError, match="no name"):
        SourceAttribution(optimizer, named[1:], THREE)
    with pytest.raises(ValueError, match="reserved"):
        SourceAttribution(optimizer, named, ("gen", BEFORE_ATTACH))
    with pytest.raises(TypeError, match=r"got Wrapper \(wrapper: \.optimizer\)"):
        SourceAttribution(Wrapper(optimizer), named, THREE)

    split = SourceAttribution(optimizer, named, THREE)
    with pytest.raises(ValueError, match="unknown source 'img'"):
        with split.source("img"):
            pass
    losses(net, 0, 0)["gen"].backward()  # outside any context
    with pytest.raises(RuntimeError, match="outside any source context"):
        optimizer.step()
    optimizer.zero_grad()
    for source in ("gen", "und"):
        with split.source(source):
            losses(net, 0, 0)[source].backward()
    net.head_gen.weight.grad *= 0.5  # not one common clip factor
    with pytest.raises(RuntimeError, match=r"\['head_gen.weight'\].*scaled per parameter"):
        optimizer.step()
    with pytest.raises(ValueError, match="closure"):
        optimizer.step(lambda: None)
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="inside the source context"):
        with split.source("gen"):
            optimizer.step()

    adam = torch.optim.Adam(net.parameters())
    split = SourceAttribution(adam, named, THREE)
    adam.param_groups[0]["weight_decay"] = 0.1
    with pytest.raises(ValueError, match="L2 weight_decay was turned on after attaching"):
        adam.step()

    embedding = nn.Embedding(5, 3, sparse=True)
    split = SourceAttribution(torch.optim.Adam(embedding.parameters()), embedding.named_parameters(), THREE)
    with pytest.raises(ValueError, match="sparse gradients"):
        with split.source("gen"):
            embedding(torch.tensor([1, 2])).sum().backward()


# ---------------------------------------------------------------- DDP with no_sync accumulation
WORLD = 2


def ddp_losses(net: nn.Module, step: int, micro: int) -> dict[str, torch.Tensor]:
    """Both sources use every parameter (DDP's synced backward expects all of them)."""
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x, y = torch.randn(3, 4, generator=gen, dtype=DT), torch.randn(3, 3, generator=gen, dtype=DT)
    out = net(x)
    return {
        "gen": ((out[:, :3] - y) ** 2).mean(),
        "und": F.cross_entropy(out[:, 3:], torch.tensor([0, 1, 1])),
    }


def ddp_run(rank: int, average: bool) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Two steps; this rank's two micro-batches per step (all world's micro-batches when rank < 0, in
    one process), every (micro-batch, source) its own forward, all but the last backward in no_sync."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).to(DT)
    model = DistributedDataParallel(net) if rank >= 0 else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    group = dist.group.WORLD if average else None
    split = SourceAttribution(optimizer, net.named_parameters(), ("gen", "und"), average_over=group)
    micros = [2 * rank, 2 * rank + 1] if rank >= 0 else list(range(2 * WORLD))
    out = []
    for step in range(2):
        optimizer.zero_grad()
        for i, micro in enumerate(micros):
            for source in ("gen", "und"):
                last = i == len(micros) - 1 and source == "und"
                with (
                    model.no_sync() if rank >= 0 and not last else contextlib.nullcontext(),
                    split.source(source),
                ):
                    (ddp_losses(model, step, micro)[source] / len(micros)).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        optimizer.step()
        out.append(
            {s: split.last_parts.of_source(s) for s in ("gen", "und")} | {"total": split.last_parts.total()}
        )
    return out


def ddp_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    runs = {average: ddp_run(rank, average) for average in (True, False)}
    torch.save(runs, f"{out_file}.{rank}")
    leave_process_group()  # each run's DDP wrapper is gone with ddp_run


def test_ddp_no_sync_split_equals_one_process(tmp_path):
    """Under no_sync only the last backward all-reduces (and carries the other ranks' earlier
    micro-batches): averaging the gathered source gradients gives the one-process split again."""
    spawn_workers(ddp_worker, (str(tmp_path / "init"), str(tmp_path / "parts")), processes=WORLD)
    one = ddp_run(-1, average=False)
    for rank in range(WORLD):
        runs = torch.load(tmp_path / f"parts.{rank}", weights_only=True)
        for key in ("gen", "und", "total"):
            for a, b in zip(runs[True], one, strict=True):
                for n in b[key]:
                    assert relative(a[key][n], b[key][n]) < TOL
        unaveraged = runs[False][0]  # the sum is right, the per-rank split is not
        assert all(relative(unaveraged["total"][n], one[0]["total"][n]) < TOL for n in one[0]["total"])
        assert max(relative(unaveraged["gen"][n], one[0]["gen"][n]) for n in one[0]["gen"]) > 1e-3

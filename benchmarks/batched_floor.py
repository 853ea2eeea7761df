"""How far batching clients can go on this CPU: MLP2NN steps of K clients at once, by hand.

The issue's target for the batched engine is <= 0.5x the bare loop per client-step on the tiny
models (it shares launches). Batching K clients does not change the arithmetic per client (the
same matrix products, one set of weights per client); it can only share the fixed cost of each
operation (dispatch, autograd bookkeeping, kernel start). This script measures what is left to
share with MLP2NN (784-200-200-10) at B = 10, K = 10 clients, plain SGD, on one thread, by
timing the same client-steps five ways (random inputs and labels, process CPU time per
client-step, interleaved repeats, median):

- ``bare``: the bare loop of ``overhead.py``: one ``nn.Module`` per client in turn,
  ``loss.backward()``, ``torch.optim.SGD``;
- ``manual_seq``: the same clients in turn, forward and backward written by hand (``addmm``,
  ``relu``, softmax minus one-hot, ``mm``), the update fused into the gradient product
  (``W.addmm_(h.T, dz, alpha=-lr)``): no autograd, no optimizer, the fewest operations a
  step can be written with;
- ``bmm_autograd``: all K clients at once, weights stacked ``(K, in, out)``, ``baddbmm``
  forward, ``torch.autograd.grad`` and one foreach update (what ``vmap`` of a module's
  forward turns into, without ``vmap``'s own cost);
- ``bmm_manual``: all K clients at once, written by hand as in ``manual_seq`` with
  ``baddbmm`` (the floor of any batched engine with these kernels);
- ``engine``: ``BatchedEngine.run_round`` on the same stacked problem (MLP2NN, FedAvg).

If even ``bmm_manual / bare`` is above 0.5, the target is not reachable with these kernels on
this CPU: the remaining time is the matrix products themselves.

Example:
    OMP_NUM_THREADS=1 python benchmarks/batched_floor.py --repeats 7 --json runs/bench/bf.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import interleaved, write_json  # noqa: E402

from fl_lightning.algorithms import FedAvg  # noqa: E402
from fl_lightning.engine import ClientPlan, RoundPlan  # noqa: E402
from fl_lightning.engines import BatchedEngine  # noqa: E402
from fl_lightning.models import MLP2NN  # noqa: E402

LR = 0.05
SIZES = (784, 200, 200, 10)


def manual_step(ws: list, bs: list, x, onehot, lr: float) -> None:
    """One SGD step of the MLP on one client, by hand; ``ws[i]`` is ``(in, out)``."""
    hs, zs = [x], []
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        z = torch.addmm(b, hs[-1], w)
        zs.append(z)
        hs.append(torch.relu(z) if i < len(ws) - 1 else z)
    dz = torch.softmax(zs[-1], dim=1).sub_(onehot).div_(x.shape[0])
    for i in range(len(ws) - 1, -1, -1):
        dh = dz @ ws[i].T if i > 0 else None
        bs[i].sub_(dz.sum(0), alpha=lr)
        ws[i].addmm_(hs[i].T, dz, alpha=-lr)
        if dh is not None:
            dz = dh.mul_(zs[i - 1] > 0)


def bmm_manual_step(ws: list, bs: list, x, onehot, lr: float) -> None:
    """``manual_step`` for K clients at once: ``x`` is ``(K, B, in)``, ``ws[i]`` is
    ``(K, in, out)``, ``bs[i]`` is ``(K, 1, out)``."""
    hs, zs = [x], []
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        z = torch.baddbmm(b, hs[-1], w)
        zs.append(z)
        hs.append(torch.relu(z) if i < len(ws) - 1 else z)
    dz = torch.softmax(zs[-1], dim=2).sub_(onehot).div_(x.shape[1])
    for i in range(len(ws) - 1, -1, -1):
        dh = torch.bmm(dz, ws[i].transpose(1, 2)) if i > 0 else None
        bs[i].sub_(dz.sum(1, keepdim=True), alpha=lr)
        ws[i].baddbmm_(hs[i].transpose(1, 2), dz, alpha=-lr)
        if dh is not None:
            dz = dh.mul_(zs[i - 1] > 0)


def bmm_autograd_step(ws: list, bs: list, x, y, lr: float) -> None:
    leaves = [*ws, *bs]
    for t in leaves:
        t.requires_grad_(True)
    h = x
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        h = torch.baddbmm(b, h, w)
        if i < len(ws) - 1:
            h = torch.relu(h)
    k, batch = x.shape[:2]
    loss = F.cross_entropy(h.reshape(k * batch, -1), y.reshape(-1), reduction="sum") / batch
    grads = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        torch._foreach_add_([t.detach() for t in leaves], list(grads), alpha=-lr)
    for t in leaves:
        t.requires_grad_(False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="local steps per client")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    k, batch, steps = args.clients, args.batch, args.steps
    xs = torch.randn(steps, k, batch, SIZES[0])
    ys = torch.randint(0, SIZES[-1], (steps, k, batch))
    onehots = F.one_hot(ys, SIZES[-1]).float()
    net = MLP2NN(SIZES[-1], (1, 28, 28))
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.in_features for m in linears] + [linears[-1].out_features] == list(SIZES)
    w0 = [m.weight.detach().T.contiguous() for m in linears]  # (in, out)
    b0 = [m.bias.detach().clone() for m in linears]

    local = MLP2NN(SIZES[-1], (1, 28, 28))

    def bare() -> None:
        for c in range(k):
            local.load_state_dict(net.state_dict())
            opt = torch.optim.SGD(local.parameters(), lr=LR)
            for s in range(steps):
                opt.zero_grad()
                F.cross_entropy(local(xs[s, c]), ys[s, c]).backward()
                opt.step()

    def manual_seq() -> None:
        for c in range(k):
            ws, bs = [w.clone() for w in w0], [b.clone() for b in b0]
            for s in range(steps):
                manual_step(ws, bs, xs[s, c], onehots[s, c], LR)

    def stacked():
        return ([w.expand(k, *w.shape).clone() for w in w0],
                [b.expand(k, 1, *b.shape).clone() for b in b0])

    def bmm_manual() -> None:
        ws, bs = stacked()
        for s in range(steps):
            bmm_manual_step(ws, bs, xs[s], onehots[s], LR)

    def bmm_autograd() -> None:
        ws, bs = stacked()
        for s in range(steps):
            bmm_autograd_step(ws, bs, xs[s], ys[s], LR)

    # the engine on the same data: client c's step s is rows (s, c) of xs
    x_flat = xs.permute(1, 0, 2, 3).reshape(k * steps * batch, 1, 28, 28)
    y_flat = ys.permute(1, 0, 2).reshape(-1)
    per = steps * batch
    plan = RoundPlan(0, [ClientPlan(c, per, list(torch.arange(c * per, (c + 1) * per).split(
        batch))) for c in range(k)])
    gp = {n: p.detach().clone() for n, p in net.named_parameters()}

    def engine() -> None:
        BatchedEngine().run_round(FedAvg(), net, gp, {}, plan, (x_flat, y_flat), LR, 0.0, 0.0)

    runs = {"bare": bare, "manual_seq": manual_seq, "bmm_autograd": bmm_autograd,
            "bmm_manual": bmm_manual, "engine": engine}
    names = list(runs)
    times = {n: [t / (k * steps) for t in v]  # per client-step
             for n, v in interleaved(runs, args.repeats).items()}
    out = {
        "clients": k, "batch": batch, "steps": steps,
        "us_per_client_step_median": {n: 1e6 * statistics.median(v) for n, v in times.items()},
        "over_bare": {n: statistics.median(a / b for a, b in zip(times[n], times["bare"],
                                                                 strict=True))
                      for n in names if n != "bare"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()},
        "command": " ".join(["python", "benchmarks/batched_floor.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for n in names:
        ratio = "" if n == "bare" else f"  ({out['over_bare'][n]:.3f}x bare)"
        print(f"{n:13s} {out['us_per_client_step_median'][n]:8.1f} us/client-step{ratio}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

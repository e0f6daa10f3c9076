"""Property-based fuzzing (hypothesis) of divergence detection (issue 25): no run returns a model whose loss is
non-finite.

A run diverges "exactly at its last step" when the losses of its first E steps are finite and the model after the
E-th update is not (finite weights whose logits overflow). The loss window only ever sees the losses computed
*before* each update, so this is the case the final check exists for. For each case the fuzz finds, by bisection
on the learning rate, a run whose first non-finite loss is at step E (0-based: the model after E updates), then
asserts that training for E steps raises a :class:`DivergenceError` naming step E -- the step a longer run names --
and that training for E - 1 steps returns a model whose loss is finite. Examples are derandomised
(:func:`tests.helpers.fuzz_settings`).
"""

import math
import re
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from ptyl.errors import DivergenceError
from ptyl.training import fit
from tests.helpers import fuzz_settings

COVERED: Counter = Counter()  # the E of every example that found its learning rate (printed at the end with -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nlast-step divergences checked, by E: {dict(sorted(COVERED.items()))}")


@dataclass(frozen=True)
class Case:
    """One tiny full-batch problem (an MLP on two Gaussian blobs) and how it is trained."""

    seed: int = 0
    width: int = 8
    n: int = 64
    inference: str = "map"
    momentum: float = 0.9
    check_every: int = 50

    def data(self) -> TensorDataset:
        gen = torch.Generator().manual_seed(self.seed)
        y = torch.arange(self.n) % 2
        return TensorDataset(torch.randn(self.n, 3, generator=gen) + 2 * y[:, None].float(), y)

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = nn.Sequential()
        model.add_module("body", nn.Linear(3, self.width))
        model.add_module("act", nn.ReLU())
        model.add_module("head", nn.Linear(self.width, 2))
        return model

    def fit(self, lr: float, steps: int):
        """Train for ``steps`` full-batch steps (constant schedule, no clipping, no prior): the result or the error."""
        model = self.model()
        try:
            result = fit(model, self.data(), None, inference=self.inference, epochs=steps, batch_size=self.n, lr=lr,
                         schedule="constant", grad_clip=None, momentum=self.momentum, check_every=self.check_every,
                         num_samples=1, burn_in_fraction=0.0, progress=False)
        except DivergenceError as err:
            return err
        return result

    def first_nonfinite_step(self, lr: float, budget: int) -> int | None:
        """The step a run of ``budget`` steps names, or ``None`` when it returns."""
        outcome = self.fit(lr, budget)
        if isinstance(outcome, DivergenceError):
            return int(re.search(r"step (\d+)", str(outcome)).group(1))
        return None


def lr_diverging_at(case: Case, steps: int) -> float | None:
    """A learning rate whose run first has a non-finite loss at step ``steps`` (bisection on log10 lr in [0, 30]:
    the step falls as the rate grows), probed with a budget of ``steps + 3``; ``None`` if the step is skipped."""
    lo, hi = 0.0, 30.0
    for _ in range(14):
        mid = (lo + hi) / 2
        named = case.first_nonfinite_step(10.0**mid, steps + 3)
        if named == steps:
            return 10.0**mid
        if named is None or named > steps:
            lo = mid
        else:
            hi = mid
    return None


def check_last_step_divergence(case: Case, steps: int, *, lr: float) -> None:
    COVERED[steps] += 1
    outcome = case.fit(lr, steps)
    assert isinstance(outcome, DivergenceError), (
        f"{case}, lr {lr:.3g}: {steps} steps returned a model whose loss is non-finite without an error")
    assert re.search(rf"step {steps}\b", str(outcome)), str(outcome)
    if steps > 1:  # one step fewer: a finite model, returned
        result = case.fit(lr, steps - 1)
        assert not isinstance(result, DivergenceError), str(result)
        x, y = case.data().tensors
        with torch.no_grad():
            assert math.isfinite(float(F.cross_entropy(result.model(x), y)))
            assert torch.isfinite(result.predict(case.data())).all()


@pytest.mark.parametrize("steps", range(1, 9))
def test_a_run_that_diverges_at_its_last_step_is_an_error(steps):
    """E = 1..8 on the issue's setting (tiny MLP, full batch, constant schedule, no clipping, no prior)."""
    case = Case()
    lr = lr_diverging_at(case, steps)
    assert lr is not None, f"no learning rate makes {case} diverge first at step {steps}"
    check_last_step_divergence(case, steps, lr=lr)


@fuzz_settings(48)
@given(steps=st.integers(1, 8), seed=st.integers(0, 2**16), width=st.integers(2, 16), n=st.sampled_from([8, 32, 64]),
       inference=st.sampled_from(["map", "sgld"]), momentum=st.sampled_from([0.0, 0.9]),
       check_every=st.integers(1, 10))
def test_fuzz_last_step_divergence(steps, seed, width, n, inference, momentum, check_every):
    """Any problem, sampler or check interval: the last step's divergence is found and named."""
    momentum = 0.0 if inference == "sgld" else momentum
    case = Case(seed, width, n, inference, momentum, check_every)
    lr = lr_diverging_at(case, steps)
    assume(lr is not None)  # this problem's first non-finite step jumps over E
    check_last_step_divergence(case, steps, lr=lr)

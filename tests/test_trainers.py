"""trainers: the compatibility-loss registry and train_compatible on real small data."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainers
from nas.data import preprocess, stratified_split
from nas.metrics import retrieval_metrics
from search_spaces import build, create_space
from trainers import CompatibilityLoss, EpochResult, RegressionLoss, TrainingDiverged, create_loss, list_losses, train_compatible

try:
    from _fixtures import digits_uint8
except ImportError:  # tests/ imported as a package
    from tests._fixtures import digits_uint8



EMBED = 16
RES = 16


# --------------------------------------------------------------------------- losses


def test_list_losses() -> None:
    assert "regression" in list_losses()
    assert list_losses() == sorted(list_losses())


def test_create_loss_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        create_loss("regresion")
    assert "'regresion'" in str(info.value)
    assert "Did you mean 'regression'" in str(info.value)
    for name in list_losses():
        assert name in str(info.value)


def test_create_loss_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        create_loss("regression", metric="l2")
    assert "'metric'" in str(info.value)
    assert "distance" in str(info.value)


def test_regression_distance_is_validated() -> None:
    with pytest.raises(ValueError, match="'l1'"):
        create_loss("regression", distance="l1")
    assert isinstance(create_loss("regression", distance="cosine"), RegressionLoss)
    assert create_loss("regression").distance == "l2"


def _unit_batch(seed: int, n: int = 32, dim: int = EMBED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1)


@pytest.mark.parametrize("seed", range(3))
def test_regression_l2_is_twice_cosine_for_unit_vectors(seed: int) -> None:
    q, t = _unit_batch(seed), _unit_batch(seed + 100)
    labels = torch.zeros(len(q), dtype=torch.long)
    l2 = create_loss("regression", distance="l2")(q, t, labels)
    cos = create_loss("regression", distance="cosine")(q, t, labels)
    assert l2.ndim == 0 and cos.ndim == 0
    assert torch.allclose(l2, 2 * cos, atol=1e-5)


def test_regression_values_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    # squared distances 2 and 0 -> mean 1; cosines 0 and 1 -> mean(1 - cos) = 0.5
    assert float(create_loss("regression")(q, t, labels)) == pytest.approx(1.0)
    assert float(create_loss("regression", distance="cosine")(q, t, labels)) == pytest.approx(0.5)
    # labels are ignored
    assert float(create_loss("regression")(q, t, torch.tensor([5, 5]))) == pytest.approx(1.0)


@pytest.mark.parametrize("name", list_losses())
def test_loss_contract(name: str) -> None:
    loss = create_loss(name)
    assert isinstance(loss, CompatibilityLoss)
    assert loss.name == name
    target = _unit_batch(1)
    labels = torch.arange(len(target)) % 4
    query = _unit_batch(2).requires_grad_(True)
    value = loss(query, target, labels)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()
    # embeddings on their targets score better than random ones
    assert float(loss(target, target, labels)) < float(loss(_unit_batch(3), target, labels))


# --------------------------------------------------------------------------- training on real data


class _Problem:
    """sklearn digits upsampled to 16x16; targets from a fixed 'gallery network': a class
    centre plus a random projection of the pixels, L2-normalised."""

    def __init__(self) -> None:
        images, labels = digits_uint8()
        self.images = images[..., None]
        self.labels = labels
        self.split = stratified_split(labels, 0.6, 0.05, 0.15, 0.2, seed=0)
        rng = np.random.default_rng(0)
        centers = rng.standard_normal((10, EMBED))
        projection = rng.standard_normal((64, EMBED)) / 8.0
        pixels = images.reshape(len(images), -1).astype(np.float64) / 255.0
        pixel_part = pixels @ projection
        pixel_part /= np.linalg.norm(pixel_part, axis=1, keepdims=True)
        targets = 2.0 * centers[labels] / np.linalg.norm(centers[labels], axis=1, keepdims=True) + pixel_part
        self.targets = (targets / np.linalg.norm(targets, axis=1, keepdims=True)).astype(np.float32)
        self.x_train = preprocess(self.images[self.split.train], RES)
        self.t_train = torch.from_numpy(self.targets[self.split.train])
        self.y_train = torch.from_numpy(labels[self.split.train])

    def asymmetric_map(self, model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            query = model(preprocess(self.images[self.split.query], RES)).numpy()
        s = self.split
        return retrieval_metrics(query, self.labels[s.query], self.targets[s.gallery], self.labels[s.gallery])["mAP"]


@pytest.fixture(scope="module")
def problem() -> _Problem:
    return _Problem()


def _net(seed: int = 0, embed_dim: int = EMBED) -> torch.nn.Module:
    torch.manual_seed(seed)
    space = create_space("mobilenet", embed_dim, 1, resolutions=[RES])
    return build(space.extreme(smallest=True))


def test_training_raises_asymmetric_map(problem: _Problem) -> None:
    model = _net()
    paragon = retrieval_metrics(
        problem.targets[problem.split.query], problem.labels[problem.split.query],
        problem.targets[problem.split.gallery], problem.labels[problem.split.gallery],
    )["mAP"]
    before = problem.asymmetric_map(model)
    history = train_compatible(
        model, problem.x_train, problem.t_train, problem.y_train, create_loss("regression"),
        epochs=4, batch_size=64, lr=3e-3, seed=0,
    )
    after = problem.asymmetric_map(model)
    assert paragon > 0.9  # the targets themselves are well separated
    assert before < 0.35
    assert after > before + 0.3, (before, after)
    assert after > 0.55
    assert [r.epoch for r in history] == [1, 2, 3, 4]
    assert history[-1].train_loss < 0.6 * history[0].train_loss
    assert all(r.seconds >= 0 for r in history)
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"


def test_on_epoch_called_once_per_epoch_in_eval_mode(problem: _Problem) -> None:
    model = _net()
    calls: list[tuple[EpochResult, bool]] = []
    n = 256
    history = train_compatible(
        model, problem.x_train[:n], problem.t_train[:n], problem.y_train[:n], create_loss("regression"),
        epochs=3, batch_size=64, seed=0, on_epoch=lambda r: calls.append((r, model.training)),
    )
    assert [c[0].epoch for c in calls] == [1, 2, 3]
    assert [c[0] for c in calls] == history
    assert not any(training for _, training in calls)
    assert all(np.isfinite(r.train_loss) for r in history)


def test_on_epoch_may_stop_training(problem: _Problem) -> None:
    class Stop(Exception):
        pass

    model = _net()
    seen: list[int] = []

    def stop_at_two(result: EpochResult) -> None:
        seen.append(result.epoch)
        if result.epoch == 2:
            raise Stop

    n = 128
    with pytest.raises(Stop):
        train_compatible(
            model, problem.x_train[:n], problem.t_train[:n], problem.y_train[:n], create_loss("regression"),
            epochs=5, batch_size=64, on_epoch=stop_at_two,
        )
    assert seen == [1, 2]
    assert not model.training


def test_huge_learning_rate_diverges_with_epoch_in_message(problem: _Problem) -> None:
    model = _net()
    n = 512
    with pytest.raises(TrainingDiverged) as info:
        train_compatible(
            model, problem.x_train[:n], problem.t_train[:n], problem.y_train[:n], create_loss("regression"),
            epochs=3, batch_size=64, optimizer="sgd", lr=1e8, schedule="none",
        )
    message = str(info.value)
    assert re.search(r"epoch \d+", message), message
    assert "sgd" in message and "1e+08" in message
    assert isinstance(info.value, RuntimeError)
    assert not model.training
    assert trainers.TrainingDiverged is TrainingDiverged


def test_same_seed_same_training(problem: _Problem) -> None:
    n = 192
    runs = []
    for _ in range(2):
        model = _net(seed=3)
        history = train_compatible(
            model, problem.x_train[:n], problem.t_train[:n], problem.y_train[:n], create_loss("regression"),
            epochs=2, batch_size=64, seed=5,
        )
        runs.append(([r.train_loss for r in history], model.embed.weight.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(("optimizer", "schedule"), [("sgd", "step"), ("adamw", "none"), ("sgd", "cosine")])
def test_other_optimizers_and_schedules_reduce_the_loss(problem: _Problem, optimizer: str, schedule: str) -> None:
    model = _net()
    n = 256
    history = train_compatible(
        model, problem.x_train[:n], problem.t_train[:n], problem.y_train[:n], create_loss("regression", distance="cosine"),
        epochs=3, batch_size=32, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, schedule=schedule,
    )
    assert history[-1].train_loss < history[0].train_loss


def test_fewer_images_than_a_batch_still_trains(problem: _Problem) -> None:
    model = _net()
    history = train_compatible(
        model, problem.x_train[:10], problem.t_train[:10], problem.y_train[:10], create_loss("regression"),
        epochs=2, batch_size=64,
    )
    assert len(history) == 2


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"optimizer": "adam"}, "optimizer"), ({"schedule": "linear"}, "schedule")],
)
def test_bad_optimizer_or_schedule_is_value_error(problem: _Problem, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        train_compatible(
            _net(), problem.x_train[:8], problem.t_train[:8], problem.y_train[:8], create_loss("regression"),
            epochs=1, batch_size=4, **kwargs,
        )


def test_length_mismatch_is_value_error(problem: _Problem) -> None:
    with pytest.raises(ValueError, match="same length"):
        train_compatible(
            _net(), problem.x_train[:8], problem.t_train[:7], problem.y_train[:8], create_loss("regression"),
            epochs=1, batch_size=4,
        )

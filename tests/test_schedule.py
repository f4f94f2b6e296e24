"""Schedule: when updates happen and how much they drop."""

from __future__ import annotations

import math

import pytest
from expecttest import assert_expected_inline

from sparsetorch import Schedule


def test_cosine_table() -> None:
    s = Schedule(update_interval=10, begin_step=10, end_step=50, drop_fraction=0.4)
    assert_expected_inline(
        s.table(range(0, 61, 10)),
        """\
step  update  drop_fraction
   0      no         0.4000
  10     yes         0.4000
  20     yes         0.3414
  30     yes         0.2000
  40     yes         0.0586
  50      no         0.0000
  60      no         0.0000""",
    )


def test_linear_and_constant_tables() -> None:
    linear = Schedule(update_interval=25, end_step=100, drop_schedule="linear")
    assert_expected_inline(
        linear.table(range(0, 101, 25)),
        """\
step  update  drop_fraction
   0      no         0.3000
  25     yes         0.2250
  50     yes         0.1500
  75     yes         0.0750
 100      no         0.0000""",
    )
    constant = Schedule(update_interval=50, end_step=100, drop_schedule="constant")
    assert_expected_inline(
        constant.table(range(0, 101, 50)),
        """\
step  update  drop_fraction
   0      no         0.3000
  50     yes         0.3000
 100      no         0.3000""",
    )


def test_cosine_formula() -> None:
    s = Schedule(update_interval=1, begin_step=3, end_step=13, drop_fraction=0.5)
    for k in range(3, 13):
        expected = 0.25 * (1 + math.cos(math.pi * (k - 3) / 10))
        assert math.isclose(s.drop_fraction_at(k), expected)


def test_no_update_outside_begin_and_end() -> None:
    s = Schedule(update_interval=5, begin_step=10, end_step=30)
    assert [k for k in range(100) if s.is_update_step(k)] == [10, 15, 20, 25]


def test_without_end_step_nothing_updates() -> None:
    assert not any(Schedule(update_interval=1).is_update_step(k) for k in range(50))


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"update_interval": 0}, ValueError),
        ({"update_interval": 1.5}, TypeError),
        ({"begin_step": -1}, ValueError),
        ({"begin_step": 5, "end_step": 5}, ValueError),
        ({"drop_fraction": 1.5}, ValueError),
        ({"drop_fraction": "0.3"}, TypeError),
        ({"drop_schedule": "exponential3"}, ValueError),
    ],
)
def test_bad_settings_raise(kwargs: dict[str, object], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        Schedule(**kwargs)  # type: ignore[arg-type]


def test_unknown_drop_schedule_message() -> None:
    with pytest.raises(ValueError) as error:
        Schedule(end_step=10, drop_schedule="exponential3")
    assert_expected_inline(
        str(error.value),
        """\
Unknown drop_schedule 'exponential3'.
Known drop schedules: ['constant', 'cosine', 'linear'].""",
    )

"""Flow solvers on a flow with a closed-form solution, per-token step schedules, guidance windows, head counts.

Gaussian data x₁ ~ N(μ, s²) and noise x₀ ~ N(0, 1): the rectified-flow velocity is linear,
  v(x, t) = μ + (t·s² − (1 − t)) / (t²s² + (1 − t)²) · (x − t·μ),
and the ODE maps x₀ to exactly μ + s·x₀ at t = 1, so the global error of each solver is measurable.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.sampling import flow

STEPS = (16, 32, 64)


def _gaussian_velocity(mu, s):
  def velocity(x, t, _):
    return mu + (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) ** 2) * (x - t * mu)
  return velocity


def _errors(method, mu, s, shift=1.0):
  x0 = jnp.linspace(-2.0, 2.0, 9, dtype=jnp.float32)[None]
  errs = [float(jnp.abs(flow.integrate(_gaussian_velocity(mu, s), x0, flow.FlowConfig(method, n, shift))
                        - (mu + s * x0)).max()) for n in STEPS]
  return np.asarray(errs)


@pytest.mark.parametrize("method,order", [("euler", 1.0), ("heun", 2.0)])
@pytest.mark.parametrize("mu,s", [(1.5, 0.3), (0.0, 2.0)])
def test_one_step_solvers_converge_at_their_order(method, order, mu, s):
  e = _errors(method, mu, s)
  observed = np.log2(e[:-1] / e[1:])
  print(method, mu, s, e, observed)
  assert np.all(np.abs(observed - order) < 0.25), (e, observed)


@pytest.mark.parametrize("mu,s,shift", [(1.5, 0.3, 1.0), (0.0, 2.0, 1.0), (0.0, 2.0, 3.0)])
def test_dpm_solver_2m_is_second_order_on_its_log_snr_grid(mu, s, shift):
  """On the log-SNR grid over [−2 ln N, 2 ln N] the step is h = 4 ln N / N, so the error is C·(ln N / N)²: the
  observed order plus the log correction 2·log2(ln 2N / ln N) is 2."""
  e = _errors("dpm_2m", mu, s, shift)
  observed = np.log2(e[:-1] / e[1:]) + 2 * np.log2(np.log(STEPS[1:]) / np.log(STEPS[:-1]))
  print(mu, s, shift, e, observed)
  assert np.all(np.abs(observed - 2.0) < 0.3), (e, observed)
  assert e[-1] < 0.02


def test_dpm_grid_ends_at_noise_and_data_and_shift_moves_it_to_noise():
  g1, g3 = (flow.time_grid(flow.FlowConfig("dpm_2m", 10, s)) for s in (1.0, 3.0))
  assert len(g1) == 11 and g1[0] == 0.0 and g1[-1] == 1.0 and np.all(np.diff(g1) > 0)
  assert abs(g1[1] - 1 / (1 + 10 ** 2)) < 1e-6  # sigmoid(−2 ln N)
  assert np.all(g3[1:-1] < g1[1:-1])


def test_step_schedule_grid_table_and_dynamic_step_count():
  cfg = flow.FlowConfig("euler", 8, 1.0, step_schedule=(8, 4, 2)).validate()
  grids, counts = flow.grid_table(cfg)
  assert grids.shape == (3, 9) and list(counts) == [8, 4, 2]
  np.testing.assert_allclose(grids[1], [0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 1])
  assert [int(flow.token_segment(cfg, k, 9)) for k in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  v = _gaussian_velocity(1.5, 0.3)
  x0 = jnp.ones((1, 3))
  for row in range(3):  # a traced count on a padded row equals the static program with that many steps
    got = flow.integrate(v, x0, cfg, grid=jnp.asarray(grids[row]), steps=jnp.asarray(counts[row]))
    want = flow.integrate(v, x0, flow.FlowConfig("euler", int(counts[row]), 1.0))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_head_evaluation_counts():
  n = 100
  assert flow.head_evaluations(flow.FlowConfig("sde_a", 50), n, 2) == (5000, 10000)
  assert flow.head_evaluations(flow.FlowConfig("heun", 10), n, 2) == (2000, 4000)
  sched = flow.FlowConfig("euler", 40, step_schedule=(40, 20, 10, 10))  # 25 tokens per segment
  assert flow.head_evaluations(sched, n, 2) == (25 * 80, 2 * 25 * 80)
  late = flow.FlowConfig("euler", 10, guidance_tokens=(0.0, 0.5))  # CFG on the first 50 tokens only
  assert flow.head_evaluations(late, n, 2) == (1000, 50 * 10 * 2 + 50 * 10)
  # euler grid 0, .1, …, .9 evaluated: times ≤ 0.45 guided → 5 of 10 evaluations per token
  early = flow.FlowConfig("euler", 10, guidance_times=(0.0, 0.45))
  assert flow.head_evaluations(early, n, 2) == (1000, n * (5 * 2 + 5))


def test_windowed_guidance_switches_between_branches():
  cfg = flow.FlowConfig("euler", 4, guidance_times=(0.3, 1.0))
  guided = lambda x, t, i: x * 0 + 1.0
  cond_only = lambda x, t, i: x * 0 + 2.0
  v = flow.windowed(guided, cond_only, cfg, 0.0)
  assert float(v(jnp.zeros((1, 2)), jnp.float32(0.25), 1)[0, 0]) == 2.0
  assert float(v(jnp.zeros((1, 2)), jnp.float32(0.5), 2)[0, 0]) == 1.0
  assert flow.windowed(guided, cond_only, flow.FlowConfig(), 0.0) is guided


@pytest.mark.parametrize("kwargs,message", [
    (dict(step_schedule=(50, 1)), r"step_schedule=\(50, 1\): every entry must be in \[2, steps=50\]"),
    (dict(step_schedule=(60,)), r"raise --steps to the schedule's maximum"),
    (dict(guidance_times=(0.8, 0.2)), r"guidance_times=\(0.8, 0.2\) must satisfy 0 ≤ lo ≤ hi ≤ 1"),
    (dict(guidance_tokens=(0.0, 1.5)), r"guidance_tokens"),
    (dict(method="unipc"), r"sampler method 'unipc' is not one of"),
])
def test_bad_flow_options_one_line(kwargs, message):
  with pytest.raises(ValueError, match=message) as e:
    flow.FlowConfig(**kwargs).validate()
  assert "\n" not in str(e.value)

"""The flow-sampler method names (sampling/flow.py implements them); no jax import, so CLI parsers can list them."""

METHODS = ("sde_a", "sde_b", "euler", "heun", "dpm_2m", "flow_sde", "cps")
LOGPROB_METHODS = ("flow_sde", "cps")  # samplers that record Gaussian transitions (log-probs)

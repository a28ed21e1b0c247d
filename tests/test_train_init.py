"""Starting a run from a pre-trained CLIP (config.model_init): towers come from the source, heads
stay freshly initialised, and everything lands on the mesh with the configured shardings."""

import jax
import numpy as np
import transformers

from clipzoo_jax import convert
from tests import helpers


def test_model_init_replaces_towers_and_keeps_fresh_heads(tmp_path):
  config = helpers.tiny_config(tasks=("seg",))
  mc = config.model
  mc.text.eos_token_id = mc.text.vocab_size - 1
  hf_config = transformers.CLIPConfig(
      text_config=dict(hidden_size=mc.text.width, intermediate_size=mc.text.mlp_dim,
                       num_hidden_layers=mc.text.depth, num_attention_heads=mc.text.num_heads,
                       vocab_size=mc.text.vocab_size,
                       max_position_embeddings=mc.text.context_length, hidden_act="quick_gelu",
                       eos_token_id=mc.text.vocab_size - 1, bos_token_id=mc.text.vocab_size - 2,
                       pad_token_id=0),
      vision_config=dict(hidden_size=mc.image.width, intermediate_size=mc.image.mlp_dim,
                         num_hidden_layers=mc.image.depth, num_attention_heads=mc.image.num_heads,
                         image_size=mc.image.image_size, patch_size=mc.image.patch_size,
                         hidden_act="quick_gelu"),
      projection_dim=mc.embed_dim)
  transformers.CLIPModel(hf_config).save_pretrained(str(tmp_path / "clip"))
  config.model_init = str(tmp_path / "clip")

  run = helpers.run_on(config, [2, 2, 2])
  shardings = run.state_shardings
  config.model_init = ""
  fresh_heads = jax.tree.map(np.asarray, helpers.run_on(config, [2, 2, 2]).init_state()
                             ["params"]["heads"])
  config.model_init = str(tmp_path / "clip")
  state = run.init_state()  # with config.model_init set: towers loaded, heads fresh

  expected = convert.load_pretrained(config.model_init, config.model)
  for name in ("img", "txt"):
    for a, b in zip(jax.tree.leaves(state["params"][name]), jax.tree.leaves(expected[name])):
      np.testing.assert_array_equal(np.asarray(a), b)
  for a, b in zip(jax.tree.leaves(state["params"]["heads"]), jax.tree.leaves(fresh_heads)):
    np.testing.assert_array_equal(np.asarray(a), b)
  kernel = state["params"]["img"]["encoder"]["block_0"]["mlp"]["fc"]["kernel"]
  assert kernel.sharding == shardings["params"]["img"]["encoder"]["block_0"]["mlp"]["fc"]["kernel"]

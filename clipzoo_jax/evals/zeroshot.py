"""Zero-shot classification: every class name in every prompt template through the text tower,
the normalized embeddings averaged per class and normalized again (CLIP's prompt ensembling);
each image goes to the class whose embedding is closest to its own. Reports top-1 / top-5.

Class names come from `classes` (a named set such as `imagenet` from `prompts.py`, or a list) or,
when empty, from the dataset (the toy world's "red sphere", TFDS label names)."""

from __future__ import annotations

import numpy as np

from clipzoo_jax import cli
from clipzoo_jax.evals import base, metrics, prompts


def class_embeddings(predict, params, tokenizer, names, template_set, batch_size) -> np.ndarray:
  """(classes, E) unit embeddings: the mean of each class's unit prompt embeddings, renormalized."""
  tokens = np.asarray(tokenizer.encode(prompts.prompts(names, template_set)), np.int32)
  embedded = predict.embed_all("text_embedding", params, tokens, batch_size)
  mean = embedded.reshape(len(names), len(template_set), -1).mean(1)
  return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


@base.register("zeroshot")
class ZeroShot(base.Evaluator):
  OPTIONS = dict(classes="", templates="toyworld", ks=(1, 5))
  needs = ("label",)
  DEFAULT_DATASET = dict(source="toyworld", kind="classification", seed=1001)

  def __init__(self, name, config, context):
    super().__init__(name, config, context)
    self.templates = prompts.templates(self.options.templates, f"{self.where}.templates")
    given = prompts.class_names(self.options.classes, f"{self.where}.classes")
    self.class_names = given or self.dataset.classes.get("label")
    if not self.class_names:
      raise cli.UserError(f"{self.where}.classes: dataset {self.dataset.description} names no "
                          "classes; set a class-name set (e.g. 'imagenet') or a list")
    self.ks = tuple(int(k) for k in self.options.ks)

  def evaluate(self, params):
    context = self.context
    classes = class_embeddings(context.predict, params, context.tokenizer, self.class_names,
                               self.templates, self.batch_size)
    accuracy = metrics.TopKAccuracy(self.ks)
    for batch in self.dataset.batches(self.augment_options(), self.batch_size):
      labels = batch["label"]
      if labels.max(initial=0) >= len(self.class_names):
        raise cli.UserError(f"{self.where}: dataset {self.dataset.description} has label "
                            f"{labels.max()} but {len(self.class_names)} class names")
      images = context.predict.embed_all("image_embedding", params, batch["image"],
                                         self.batch_size)
      accuracy.update(images @ classes.T, labels)
    yield from accuracy.result().items()

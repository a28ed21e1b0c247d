"""Image-text retrieval: recall@1/5/10 from images to their captions and from each caption to its
image, over a dataset with one or several captions per image (cosine similarity of the towers'
unit embeddings). Metric names spell recall@k as `recall_at_k`, a name TensorBoard keeps as is, so
metrics.jsonl and TensorBoard show the same names."""

from __future__ import annotations

import numpy as np

from clipzoo_jax.evals import base, metrics


@base.register("retrieval")
class Retrieval(base.Evaluator):
  OPTIONS = dict(ks=(1, 5, 10))
  needs = ("captions",)
  DEFAULT_DATASET = dict(source="toyworld", kind="retrieval", seed=1002)

  def embeddings(self, params) -> tuple[np.ndarray, np.ndarray, int]:
    """(image embeddings (N, E), caption embeddings (N * K, E) image-major, K)."""
    predict, tokenizer = self.context.predict, self.context.tokenizer
    images, captions = [], []
    for batch in self.dataset.batches(self.augment_options(), self.batch_size):
      images.append(predict.embed_all("image_embedding", params, batch["image"], self.batch_size))
      captions.append(batch["captions"])
    captions = np.concatenate(captions)
    per_image = captions.shape[1]
    texts = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions.reshape(-1)]
    tokens = np.asarray(tokenizer.encode(texts), np.int32)
    texts = predict.embed_all("text_embedding", params, tokens, self.batch_size)
    return np.concatenate(images), texts, per_image

  def evaluate(self, params):
    images, texts, per_image = self.embeddings(params)
    image_to_texts = np.arange(len(texts)).reshape(len(images), per_image)
    ks = tuple(int(k) for k in self.options.ks)
    for name, value in metrics.retrieval_recall(images @ texts.T, image_to_texts, ks).items():
      yield name.replace("@", "_at_"), value  # TensorBoard refuses '@' in a name

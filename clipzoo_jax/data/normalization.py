"""CLIP's image normalization (OpenAI's mean and std over RGB in [0, 1]), with no TensorFlow import
so that export and conversion tools can write it into a PyTorch preprocessor config."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

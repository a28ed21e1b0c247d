"""Model-zoo experts behind one interface (`base.Expert`): HF depth, segmentation, detection,
ONNX and geometric normals, and the toy-world ground truth. Build them with `build_experts`."""

from clipzoo_jax.experts.base import Batch, Expert, ExpertError, build_expert, build_experts

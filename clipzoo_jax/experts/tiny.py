"""Tiny randomly-initialised expert models saved like real ones (`save_pretrained` folders, ONNX
files), for tests and benchmarks: no hub access, same loading path as production weights."""

from __future__ import annotations

import os
import warnings

import numpy as np


def _save(model, processor, directory: str) -> str:
  os.makedirs(directory, exist_ok=True)
  model.eval().save_pretrained(directory)
  processor.save_pretrained(directory)
  return directory


def _labels(num_labels: int, class_names=None) -> dict:
  names = list(class_names) if class_names else [f"class_{i}" for i in range(num_labels)]
  if len(names) != num_labels:
    raise ValueError(f"class_names: expected {num_labels} names, found {len(names)}")
  return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def save_dpt(directory: str, image_size: int = 64, hidden: int = 32, layers: int = 4,
             keep_aspect_ratio: bool = False, seed: int = 0) -> str:
  import torch
  from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil
  torch.manual_seed(seed)
  config = DPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, image_size=image_size, patch_size=16,
                     neck_hidden_sizes=[hidden // 4, hidden // 4, hidden // 2, hidden // 2],
                     fusion_hidden_size=hidden // 2, backbone_out_indices=list(range(layers))[-4:],
                     head_in_index=-1)
  processor = DPTImageProcessorPil(size={"height": image_size, "width": image_size},
                                   keep_aspect_ratio=keep_aspect_ratio, ensure_multiple_of=16)
  return _save(DPTForDepthEstimation(config), processor, directory)


def depth_anything_model(image_size: int = 56, hidden: int = 32, patch_size: int = 14,
                         max_depth: int | None = None, seed: int = 0):
  """(model, processor). `max_depth` set: a metric model (sigmoid head scaled to metres, as Depth
  Anything V2's metric checkpoints); None: relative inverse depth."""
  import torch
  from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config,
                            DPTImageProcessorPil)
  torch.manual_seed(seed)
  backbone = Dinov2Config(hidden_size=hidden, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_size=hidden * 3 // 2, patch_size=patch_size,
                          image_size=image_size,
                          out_features=["stage1", "stage2", "stage3", "stage4"],
                          reshape_hidden_states=False)
  metric = {} if max_depth is None else {"depth_estimation_type": "metric", "max_depth": max_depth}
  config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 8, 16, 16],
                               fusion_hidden_size=16, head_hidden_size=8,
                               reassemble_hidden_size=hidden, patch_size=patch_size, **metric)
  processor = DPTImageProcessorPil(size={"height": image_size, "width": image_size},
                                   keep_aspect_ratio=True, ensure_multiple_of=patch_size)
  return DepthAnythingForDepthEstimation(config), processor


def save_depth_anything(directory: str, image_size: int = 56, seed: int = 0) -> str:
  return _save(*depth_anything_model(image_size, seed=seed), directory)


def save_zoedepth(directory: str, image_size: int = 32, seed: int = 0) -> str:
  import torch
  from transformers import (BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation,
                            ZoeDepthImageProcessorPil)
  torch.manual_seed(seed)
  backbone = BeitConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=48, image_size=image_size, patch_size=16,
                        use_relative_position_bias=True, reshape_hidden_states=False,
                        out_features=["stage1", "stage2", "stage3", "stage4"])
  # ZoeDepth hard-codes 256 channels in its bottleneck, so the fusion width must be 256.
  config = ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[8, 8, 16, 16],
                          fusion_hidden_size=256, bottleneck_features=256,
                          reassemble_factors=[4, 2, 1, 0.5], backbone_hidden_size=32,
                          num_relative_features=8, bin_embedding_dim=16, head_in_index=-1,
                          bin_configurations=[{"n_bins": 8, "min_depth": 0.001,
                                               "max_depth": 10.0, "name": "nyu"}],
                          num_attractors=[4, 2, 2, 1])
  processor = ZoeDepthImageProcessorPil(size={"height": image_size, "width": image_size},
                                        keep_aspect_ratio=True, ensure_multiple_of=16)
  return _save(ZoeDepthForDepthEstimation(config), processor, directory)


def segformer_model(num_labels: int = 5, image_size: int = 64, hidden_sizes=(8, 16), depths=(1, 1),
                    decoder: int = 16, num_attention_heads=None, class_names=None, seed: int = 0):
  """(model, processor); heads default to SegFormer's (1, 2, 5, 8), one per encoder block."""
  import torch
  from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil
  torch.manual_seed(seed)
  blocks = len(hidden_sizes)
  config = SegformerConfig(num_encoder_blocks=blocks, depths=list(depths),
                           sr_ratios=[8, 4, 2, 1][-blocks:], hidden_sizes=list(hidden_sizes),
                           num_attention_heads=list(num_attention_heads or [1, 2, 5, 8][:blocks]),
                           patch_sizes=[7, 3, 3, 3][:blocks], strides=[4, 2, 2, 2][:blocks],
                           mlp_ratios=[4] * blocks, decoder_hidden_size=decoder,
                           **_labels(num_labels, class_names))
  processor = SegformerImageProcessorPil(size={"height": image_size, "width": image_size})
  return SegformerForSemanticSegmentation(config), processor


def save_segformer(directory: str, num_labels: int = 5, image_size: int = 64,
                   hidden_sizes=(8, 16), depths=(1, 1), decoder: int = 16, seed: int = 0) -> str:
  return _save(*segformer_model(num_labels, image_size, hidden_sizes, depths, decoder, seed=seed),
               directory)


def save_upernet(directory: str, num_labels: int = 6, image_size: int = 64, seed: int = 0) -> str:
  import torch
  from transformers import (ConvNextConfig, SegformerImageProcessorPil, UperNetConfig,
                            UperNetForSemanticSegmentation)
  torch.manual_seed(seed)
  backbone = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                            out_features=["stage1", "stage2", "stage3", "stage4"])
  config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=24,
                         auxiliary_channels=8, use_auxiliary_head=False, **_labels(num_labels))
  processor = SegformerImageProcessorPil(size={"height": image_size, "width": image_size})
  return _save(UperNetForSemanticSegmentation(config), processor, directory)


def save_mask2former(directory: str, num_labels: int = 7, image_size: int = 64, seed: int = 0) -> str:
  import torch
  from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                            Mask2FormerImageProcessorPil, SwinConfig)
  torch.manual_seed(seed)
  backbone = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                        num_heads=[1, 1, 2, 2], window_size=4,
                        out_features=["stage1", "stage2", "stage3", "stage4"])
  # Mask2Former's pixel decoder uses GroupNorm(32, ...): widths must be multiples of 32.
  config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32,
                             hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32,
                             num_queries=10, decoder_layers=2, encoder_layers=1,
                             num_attention_heads=2, common_stride=4, **_labels(num_labels))
  processor = Mask2FormerImageProcessorPil(size={"height": image_size, "width": image_size})
  return _save(Mask2FormerForUniversalSegmentation(config), processor, directory)


def save_oneformer(directory: str, num_labels: int = 6, image_size: int = 64, seed: int = 0) -> str:
  """OneFormer with a byte-level CLIP tokenizer without merges (its task prompt is text) and the
  class-info file its processor reads, all inside `directory`."""
  import json
  import torch
  from transformers import (CLIPTokenizer, OneFormerConfig, OneFormerForUniversalSegmentation,
                            OneFormerImageProcessorPil, OneFormerProcessor, SwinConfig)
  from clipzoo_jax.data import tokenizer as tokenizer_lib
  torch.manual_seed(seed)
  os.makedirs(directory, exist_ok=True)
  tokens = tokenizer_lib.base_vocabulary() + [tokenizer_lib.SOT, tokenizer_lib.EOT]
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({token: i for i, token in enumerate(tokens)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write(tokenizer_lib.MERGES_HEADER + "\n")
  with open(os.path.join(directory, "class_info.json"), "w") as f:
    json.dump({str(i): {"name": f"class_{i}", "isthing": int(i >= num_labels // 2)}
               for i in range(num_labels)}, f)
  tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
  image_processor = OneFormerImageProcessorPil(
      size={"height": image_size, "width": image_size}, repo_path=directory,
      class_info_file="class_info.json", num_text=4)
  processor = OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 max_seq_length=8, task_seq_length=8)
  backbone = SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                        num_heads=[1, 1, 2, 2], window_size=4,
                        out_features=["stage1", "stage2", "stage3", "stage4"])
  config = OneFormerConfig(backbone_config=backbone, hidden_dim=32, conv_dim=32, mask_dim=32,
                           num_queries=10, encoder_feedforward_dim=32, dim_feedforward=32,
                           decoder_layers=2, encoder_layers=1, num_attention_heads=2,
                           text_encoder_width=32, text_encoder_context_length=8,
                           text_encoder_num_layers=1, text_encoder_vocab_size=len(tokens),
                           text_encoder_proj_layers=1, text_encoder_n_ctx=4, max_seq_len=8,
                           task_seq_len=8, common_stride=4, **_labels(num_labels))
  return _save(OneFormerForUniversalSegmentation(config), processor, directory)


def rtdetr_model(num_labels: int = 4, image_size: int = 64, width: int = 8,
                 decoder_layers: int = 1, num_queries: int = 20, class_names=None, seed: int = 0):
  """(model, processor); `width` scales every channel count (backbone stages w, 2w, 3w, 4w;
  transformer 2w wide)."""
  import torch
  from transformers import (RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessorPil,
                            RTDetrResNetConfig)
  torch.manual_seed(seed)
  w = width
  backbone = RTDetrResNetConfig(embedding_size=w, hidden_sizes=[w, 2 * w, 3 * w, 4 * w],
                                depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"])
  config = RTDetrConfig(backbone_config=backbone, encoder_hidden_dim=2 * w,
                        encoder_in_channels=[2 * w, 3 * w, 4 * w], d_model=2 * w,
                        encoder_ffn_dim=4 * w, decoder_ffn_dim=4 * w, num_queries=num_queries,
                        decoder_layers=decoder_layers, encoder_layers=1,
                        decoder_in_channels=[2 * w] * 3, num_feature_levels=3,
                        decoder_attention_heads=2, encoder_attention_heads=2, num_denoising=0,
                        **_labels(num_labels, class_names))
  processor = RTDetrImageProcessorPil(size={"height": image_size, "width": image_size})
  return RTDetrForObjectDetection(config), processor


def save_rtdetr(directory: str, num_labels: int = 4, image_size: int = 64, seed: int = 0) -> str:
  return _save(*rtdetr_model(num_labels, image_size, seed=seed), directory)


def save_detr(directory: str, num_labels: int = 4, image_size: int = 64, seed: int = 0) -> str:
  """DETR with a transformers ResNet backbone (the hub's DETR needs timm, which we avoid)."""
  import torch
  from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig
  torch.manual_seed(seed)
  backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                          out_features=["stage4"])
  config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                      d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
                      encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, **_labels(num_labels))
  processor = DetrImageProcessorPil(size={"height": image_size, "width": image_size})
  return _save(DetrForObjectDetection(config), processor, directory)


def save_normals_onnx(path: str, seed: int = 0) -> str:
  """A 2-layer conv net (N, 3, H, W) -> (N, 3, H/2, W/2) exported to ONNX with dynamic shapes."""
  import torch
  torch.manual_seed(seed)
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  axes = {0: "batch", 2: "height", 3: "width"}
  with warnings.catch_warnings():  # the TorchScript exporter needs no onnxscript; it warns
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), path, input_names=["image"],
                      output_names=["normals"], dynamic_axes={"image": axes, "normals": axes},
                      dynamo=False)
  return path


def random_images(seed: int, sizes) -> list[np.ndarray]:
  """Smooth random images (blocky colour fields), so models see structure rather than noise."""
  rng = np.random.default_rng(seed)
  images = []
  for height, width in sizes:
    coarse = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    image = np.kron(coarse, np.ones((8, 8, 1), np.uint8))[:height, :width]
    image = np.pad(image, ((0, height - image.shape[0]), (0, width - image.shape[1]), (0, 0)), "edge")
    noisy = image.astype(np.int16) + rng.integers(-20, 21, image.shape)
    images.append(np.clip(noisy, 0, 255).astype(np.uint8))
  return images

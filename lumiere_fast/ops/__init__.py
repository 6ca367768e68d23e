"""The op layer: every hot op of the temporal modules, each with its plain-PyTorch reference beside it.

Modules call only these functions; each decides its implementation (``backend.choose``) in one place.
"""

from .attention import (attention_layer, attention_layer_ref, mp_attention_layer, mp_attention_layer_ref, softmax_attention,
                        mp_temporal_attention_block, mp_temporal_attention_block_ref, temporal_attention_block,
                        temporal_attention_block_ref)
from .conv_block import (mp_temporal_conv_block, mp_temporal_conv_block_ref, temporal_conv_block,
                         temporal_conv_block_ref)
from .fold import fold_frames, fold_frames_ref, unfold_frames, unfold_frames_ref
from .mp_math import mp_add, mp_silu, pixel_norm
from .resample import (mp_temporal_downsample, mp_temporal_downsample_ref, mp_temporal_upsample,
                       mp_temporal_upsample_ref, temporal_downsample, temporal_downsample_ref, temporal_upsample,
                       temporal_upsample_ref)
from .extension import extension_status
from .karras import mp_cat, mp_cat_ref, pixel_norm_silu, pixel_norm_silu_ref, pixel_norm_sumsq, scale_silu, scale_silu_ref
from .temporal_conv1d import temporal_conv1d, temporal_conv1d_ref
from .weight_norm import mp_weight, mp_weight_ref, normalize_weight, renormalize_

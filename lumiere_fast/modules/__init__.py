"""The eight temporal modules: parameters and state-dict keys as upstream, math in ``lumiere_fast.ops``."""

from .attention import AttentionInflationBlock, MPAttentionInflationBlock
from .conv import ConvolutionInflationBlock, MPConvolutionInflationBlock
from .base import TemporalModule
from .resample import MPTemporalDownsample, MPTemporalUpsample, TemporalDownsample, TemporalUpsample

__all__ = ['ConvolutionInflationBlock', 'AttentionInflationBlock', 'TemporalDownsample', 'TemporalUpsample',
           'MPConvolutionInflationBlock', 'MPAttentionInflationBlock', 'MPTemporalDownsample', 'MPTemporalUpsample',
           'TemporalModule']

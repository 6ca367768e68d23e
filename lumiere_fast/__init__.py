"""lumiere_fast: a drop-in, faster replacement for lumiere-pytorch 0.0.24.

    from lumiere_fast import Lumiere, MPLumiere
"""

from .lumiere import Lumiere, MPLumiere
from .modules import (AttentionInflationBlock, ConvolutionInflationBlock, MPAttentionInflationBlock,
                      MPConvolutionInflationBlock, MPTemporalDownsample, MPTemporalUpsample, TemporalDownsample,
                      TemporalUpsample)

__version__ = '0.1.0'

__all__ = ['Lumiere', 'MPLumiere', 'ConvolutionInflationBlock', 'AttentionInflationBlock', 'TemporalDownsample',
           'TemporalUpsample', 'MPConvolutionInflationBlock', 'MPAttentionInflationBlock', 'MPTemporalDownsample',
           'MPTemporalUpsample']

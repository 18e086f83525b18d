"""Pure tensor functions, one per distillation loss. Batch-mean reductions unless a docstring says otherwise.

Each family lives in its own module and lists its functions in ``__all__``.
"""

from fisherkd.functional.attention import *  # noqa: F403
from fisherkd.functional.attention import __all__ as _attention
from fisherkd.functional.cross_tokenizer import *  # noqa: F403
from fisherkd.functional.cross_tokenizer import __all__ as _cross_tokenizer
from fisherkd.functional.features import *  # noqa: F403
from fisherkd.functional.features import __all__ as _features
from fisherkd.functional.head import *  # noqa: F403
from fisherkd.functional.head import __all__ as _head
from fisherkd.functional.logits import *  # noqa: F403
from fisherkd.functional.logits import __all__ as _logits
from fisherkd.functional.relations import *  # noqa: F403
from fisherkd.functional.relations import __all__ as _relations

__all__ = [*_logits, *_features, *_attention, *_relations, *_head, *_cross_tokenizer]

"""FakeTensorMode for less: the same results, op for op, at about half the Python per op.

The fake probe (bench/measure/probes.py, FakeLiveTensors) dispatches every op of a full-size model through
FakeTensorMode. Profiled on a 32K-token MELT prefill at Ouro-1.4B (bfloat16, chunks of 500), a fake
op took about 100 us, and half of it built the key of FakeTensorMode's dispatch cache: its
_prep_args_for_hash flattens every argument's full TensorMetadata (17 fields, each through a chain
of isinstance checks) on every call, hit or miss. A quarter went to synthesising the output from
the cache entry, the rest to the decomposition of _unsafe_view (never cached) and to the answers to
a fake tensor's .device, which C++ asks for through Python (a third of all calls).

CachedFakeTensorMode.fake_dispatch returns what FakeTensorMode.__torch_dispatch__ returns:
- _memo_key is a cheap key holding everything FakeTensorMode's key is made of, so equal memo keys
  mean equal FakeTensorMode keys. Once FakeTensorMode has a valid cache entry for an op's key, a
  call with the same memo key builds its output from that entry with FakeTensorMode's own code
  (_output_from_cache_entry), as its cache hit does. First calls, ops it declines to cache and
  arguments the memo key does not cover (other tensors, constants, symbolic values) take
  FakeTensorMode's full path, as before, nested ops and all.
- _unsafe_view (every linear on [B, S, d] ends in one) runs as FakeTensorMode runs it, its
  decomposition aten.view(x, shape) under the mode, without the cache lookup that always bypasses.
- META_QUERIES (prim.device, aten.size / stride / storage_offset) are FakeTensorMode's own
  handlers for those queries, for a caller to answer them before any bookkeeping.
tests/test_bench_probes.py compares the fake probe's bytes with and without all this.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

try:  # FakeTensorMode's private parts, as in torch 2.13; a torch without them takes the full path
    from torch._subclasses._fake_tensor_utils import _CacheKeyState
    from torch._subclasses.fake_tensor import _DISPATCH_META_HANDLERS as META_QUERIES  # noqa: F401 (re-exported)
    from torch._subclasses.fake_tensor import _BypassDispatchCache, _DispatchCacheValidEntry
except ImportError:
    _CacheKeyState, META_QUERIES = None, {}

_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default


class _Unmemoised(Exception):
    """An argument the memo key does not cover: the op takes FakeTensorMode's full path."""


class CachedFakeTensorMode(FakeTensorMode):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # memo key -> (FakeTensorMode's key, its cache entry: None where it bypasses its cache)
        self._memo: dict[tuple, tuple] = {}

    def fake_dispatch(self, func, types, args, kwargs):
        """What FakeTensorMode.__torch_dispatch__(func, types, args, kwargs) returns."""
        if _CacheKeyState is None:
            return FakeTensorMode.__torch_dispatch__(self, func, types, args, kwargs)
        key = self._memo_key(func, args, kwargs) if self.cache_enabled else None
        hit = self._memo.get(key) if key is not None else None
        if hit is not None and hit[1] is not None:  # what FakeTensorMode._cached_dispatch_impl does on a hit
            return self._output_from_cache_entry(_CacheKeyState(self.shape_env), hit[1], hit[0], func, args)
        if func is _UNSAFE_VIEW and key is not None and not kwargs:
            # FakeTensorMode never caches it (its schema does not say that the result aliases its
            # input) and runs torch._decomp's decomposition, aten.view(x, shape), under the mode:
            # the same here; the view is dispatched nested, as there.
            with self:
                return torch.ops.aten.view.default(*args)
        cache_key = None
        if key is not None and hit is None:
            try:
                cache_key = self._cache_key(_CacheKeyState(self.shape_env), func, args, kwargs)
            except _BypassDispatchCache:
                self._memo[key] = (None, None)
        out = FakeTensorMode.__torch_dispatch__(self, func, types, args, kwargs)
        entry = FakeTensorMode.cache.get(cache_key) if cache_key is not None else None
        if entry is not None:  # valid: later calls build from it; a bypass: the full path, always
            self._memo[key] = (cache_key, entry if isinstance(entry, _DispatchCacheValidEntry) else None)
        return out

    def _memo_key(self, func, args, kwargs) -> tuple | None:
        """The op, the global settings FakeTensorMode._cache_key records, and per argument its type
        and value, or for a fake tensor of this mode its metadata (TensorMetadata's other fields,
        memory format and sparsity, follow from these for a strided tensor). Lengths and type tags
        make the flattening one-to-one. None: not memoised (as under a ShapeEnv or while tracing)."""
        if self.shape_env is not None or torch.fx.experimental.proxy_tensor.get_proxy_mode() is not None:
            return None
        key = [func, torch.get_default_dtype(), torch._C._get_default_device(), torch.is_inference_mode_enabled()]
        try:
            self._flatten(key, args)
            if kwargs:
                key.append(tuple(kwargs))
                self._flatten(key, tuple(kwargs.values()))
        except _Unmemoised:
            return None
        return tuple(key)

    def _flatten(self, key: list, values) -> None:
        key.append(len(values))
        for a in values:
            if type(a) is FakeTensor:
                if a.fake_mode is not self or a.constant is not None or a.layout != torch.strided:
                    raise _Unmemoised
                key += (FakeTensor, a.dtype, a.shape, a.stride(), a.storage_offset(),
                        a.untyped_storage().nbytes(), a.fake_device, a.requires_grad, a.is_conj(),
                        a.is_neg(), a.is_inference())
            elif isinstance(a, (list, tuple)):
                key.append(type(a))
                self._flatten(key, a)
            elif isinstance(a, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, dict)) \
                    or getattr(type(a), "__hash__", None) is None:
                raise _Unmemoised
            else:
                key += (type(a), a)

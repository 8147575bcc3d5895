// SPDX-License-Identifier: Apache-2.0
// _core.KVPool: thin bindings over banaserve::kvpool::Pool. Keys are packed from a list of
// str/bytes with the GIL held (CPython API, no per-key pybind11 casts); every call into the pool
// runs with the GIL released. Memory arrives as numpy uint64 arrays of addresses; the Python
// façade (banaserve_ext.kvpool) turns numpy arrays, torch tensors and raw pointers into those.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "banaserve/kvpool/pool.h"
#include "errors.h"

namespace banaserve::py {
namespace pyb = pybind11;
using kvpool::Pool;

namespace {

using U64Array = pyb::array_t<uint64_t, pyb::array::c_style | pyb::array::forcecast>;
using U32Array = pyb::array_t<uint32_t, pyb::array::c_style | pyb::array::forcecast>;

struct PackedKeys {
  std::string data;
  std::vector<uint64_t> offsets;
  kvpool::KeyList list() const {
    return kvpool::KeyList{data.data(), offsets.data(), offsets.size() - 1};
  }
};

PackedKeys pack_keys(const pyb::handle& keys, const std::string& suffix = std::string()) {
  PyObject* seq = PySequence_Fast(keys.ptr(), "keys must be a sequence of str or bytes");
  if (seq == nullptr) throw pyb::error_already_set();
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  PackedKeys packed;
  packed.offsets.reserve(static_cast<size_t>(n) + 1);
  packed.offsets.push_back(0);
  packed.data.reserve(static_cast<size_t>(n) * (72 + suffix.size()));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const char* ptr = nullptr;
    Py_ssize_t len = 0;
    if (PyUnicode_Check(items[i])) {
      ptr = PyUnicode_AsUTF8AndSize(items[i], &len);
      if (ptr == nullptr) {
        Py_DECREF(seq);
        throw pyb::error_already_set();
      }
    } else if (PyBytes_Check(items[i])) {
      char* raw = nullptr;
      PyBytes_AsStringAndSize(items[i], &raw, &len);
      ptr = raw;
    } else {
      Py_DECREF(seq);
      throw_if_error(BANASERVE_INVALID("key " + std::to_string(i) + " is " +
                                       Py_TYPE(items[i])->tp_name + ", expected str or bytes"),
                     "kvpool");
    }
    packed.data.append(ptr, static_cast<size_t>(len));
    packed.data.append(suffix);
    packed.offsets.push_back(packed.data.size());
  }
  Py_DECREF(seq);
  return packed;
}

kvpool::IoList make_io(const U64Array& addrs, const U64Array& seg_lens, size_t n_keys,
                       const char* where) {
  if (seg_lens.ndim() != 1 || seg_lens.size() == 0) {
    throw_if_error(BANASERVE_INVALID("seg_lens must be a non-empty 1-D array"), where);
  }
  size_t segments = static_cast<size_t>(seg_lens.size());
  if (static_cast<size_t>(addrs.size()) != n_keys * segments) {
    throw_if_error(BANASERVE_INVALID("expected " + std::to_string(n_keys * segments) +
                                     " addresses (" + std::to_string(n_keys) + " keys x " +
                                     std::to_string(segments) + " pieces), got " +
                                     std::to_string(addrs.size())),
                   where);
  }
  return kvpool::IoList{addrs.data(), seg_lens.data(), segments};
}

pyb::dict stats_dict(const kvpool::PoolStats& s) {
  pyb::dict d;
  d["num_pages"] = s.num_pages;
  d["page_size"] = s.page_size;
  d["max_key_len"] = s.max_key_len;
  d["segment_bytes"] = s.segment_bytes;
  d["overhead_bytes"] = s.overhead_bytes;
  d["committed_pages"] = s.committed_pages;
  d["reserved_pages"] = s.reserved_pages;
  d["pinned_pages"] = s.pinned_pages;
  d["free_pages"] = s.free_pages;
  d["clients"] = s.clients;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["exists_hits"] = s.exists_hits;
  d["exists_misses"] = s.exists_misses;
  d["puts"] = s.puts;
  d["put_exists"] = s.put_exists;
  d["put_no_space"] = s.put_no_space;
  d["evictions"] = s.evictions;
  d["removals"] = s.removals;
  d["reaped_clients"] = s.reaped_clients;
  d["lock_recoveries"] = s.lock_recoveries;
  d["created_unix_ns"] = s.created_unix_ns;
  d["segment_id"] = s.segment_id;
  d["closed"] = s.closed;
  return d;
}

}  // namespace

void bind_kvpool(pyb::module_& m) {
  pyb::class_<Pool>(m, "KVPool", "A shared-memory KV page pool (see banaserve_ext.kvpool)")
      .def_static(
          "create",
          [](const std::string& name, uint64_t capacity_bytes, uint32_t page_size,
             uint32_t max_key_len, uint32_t max_clients, uint32_t ops_per_client, double high,
             double low, bool populate) {
            kvpool::PoolOptions opts;
            opts.capacity_bytes = capacity_bytes;
            opts.page_size = page_size;
            opts.max_key_len = max_key_len;
            opts.max_clients = max_clients;
            opts.ops_per_client = ops_per_client;
            opts.high_watermark = high;
            opts.low_watermark = low;
            opts.populate = populate;
            StatusOr<std::unique_ptr<Pool>> pool = Status();
            {
              pyb::gil_scoped_release release;
              pool = Pool::create(name, opts);
            }
            throw_if_error(pool.status(), "KVPool.create");
            return std::move(pool).value();
          },
          pyb::arg("name"), pyb::arg("capacity_bytes"), pyb::arg("page_size"),
          pyb::arg("max_key_len") = 128, pyb::arg("max_clients") = 64,
          pyb::arg("ops_per_client") = 8, pyb::arg("high_watermark") = 0.95,
          pyb::arg("low_watermark") = 0.90, pyb::arg("populate") = true)
      .def_static(
          "open",
          [](const std::string& name, bool populate) {
            StatusOr<std::unique_ptr<Pool>> pool = Status();
            {
              pyb::gil_scoped_release release;
              pool = Pool::open(name, populate);
            }
            throw_if_error(pool.status(), "KVPool.open");
            return std::move(pool).value();
          },
          pyb::arg("name"), pyb::arg("populate") = false)
      .def_static(
          "unlink", [](const std::string& name) { throw_if_error(Pool::unlink(name), "KVPool.unlink"); },
          pyb::arg("name"))
      .def_property_readonly("name", &Pool::name)
      .def_property_readonly("page_size", &Pool::page_size)
      .def_property_readonly("num_pages", &Pool::num_pages)
      .def_property_readonly("max_key_len", &Pool::max_key_len)
      .def_property_readonly("segment_id", &Pool::segment_id)
      .def_property_readonly(
          "page_region",
          [](const Pool& pool) {
            kvpool::PageRegion r = pool.page_region();
            return pyb::make_tuple(r.addr, r.stride, r.num_pages);
          },
          "(addr, stride, num_pages): the page of slot s starts at addr + s * stride")
      .def(
          "exists",
          [](Pool& pool, const pyb::handle& keys, const std::string& suffix) {
            PackedKeys packed = pack_keys(keys, suffix);
            size_t leading = 0;
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.exists(packed.list(), nullptr, &leading);
            }
            throw_if_error(st, "KVPool.exists");
            return leading;
          },
          pyb::arg("keys"), pyb::arg("suffix") = std::string(), "number of leading keys that are committed")
      .def(
          "exists_mask",
          [](Pool& pool, const pyb::handle& keys, const std::string& suffix) {
            PackedKeys packed = pack_keys(keys, suffix);
            pyb::array_t<bool> found(static_cast<pyb::ssize_t>(packed.offsets.size() - 1));
            auto* out = reinterpret_cast<uint8_t*>(found.mutable_data());
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.exists(packed.list(), out, nullptr);
            }
            throw_if_error(st, "KVPool.exists_mask");
            return found;
          },
          pyb::arg("keys"), pyb::arg("suffix") = std::string())
      .def(
          "get_into",
          [](Pool& pool, const pyb::handle& keys, const U64Array& addrs,
             const U64Array& seg_lens, const std::string& suffix) {
            PackedKeys packed = pack_keys(keys, suffix);
            size_t n = packed.offsets.size() - 1;
            kvpool::IoList io = make_io(addrs, seg_lens, n, "KVPool.get_into");
            pyb::array_t<bool> found(static_cast<pyb::ssize_t>(n));
            auto* out = reinterpret_cast<uint8_t*>(found.mutable_data());
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.get(packed.list(), io, out, nullptr);
            }
            throw_if_error(st, "KVPool.get_into");
            return found;
          },
          pyb::arg("keys"), pyb::arg("addrs"), pyb::arg("seg_lens"), pyb::arg("suffix") = std::string())
      .def(
          "put_from",
          [](Pool& pool, const pyb::handle& keys, const U64Array& addrs,
             const U64Array& seg_lens, const std::string& suffix) {
            PackedKeys packed = pack_keys(keys, suffix);
            size_t n = packed.offsets.size() - 1;
            kvpool::IoList io = make_io(addrs, seg_lens, n, "KVPool.put_from");
            pyb::array_t<uint8_t> results(static_cast<pyb::ssize_t>(n));
            uint8_t* out = results.mutable_data();
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.put(packed.list(), io, out);
            }
            throw_if_error(st, "KVPool.put_from");
            return results;
          },
          pyb::arg("keys"), pyb::arg("addrs"), pyb::arg("seg_lens"), pyb::arg("suffix") = std::string())
      .def(
          "reserve",
          [](Pool& pool, const pyb::handle& keys, const std::string& suffix) {
            PackedKeys packed = pack_keys(keys, suffix);
            size_t n = packed.offsets.size() - 1;
            pyb::array_t<uint32_t> slots(static_cast<pyb::ssize_t>(n));
            pyb::array_t<uint8_t> results(static_cast<pyb::ssize_t>(n));
            uint32_t* s_out = slots.mutable_data();
            uint8_t* r_out = results.mutable_data();
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.reserve(packed.list(), s_out, r_out);
            }
            throw_if_error(st, "KVPool.reserve");
            return pyb::make_tuple(slots, results);
          },
          pyb::arg("keys"), pyb::arg("suffix") = std::string())
      .def(
          "pin",
          [](Pool& pool, const pyb::handle& keys, const std::string& suffix) {
            PackedKeys packed = pack_keys(keys, suffix);
            size_t n = packed.offsets.size() - 1;
            pyb::array_t<uint64_t> addrs(static_cast<pyb::ssize_t>(n));
            uint64_t* out = addrs.mutable_data();
            StatusOr<uint32_t> handle = Status();
            {
              pyb::gil_scoped_release release;
              handle = pool.pin(packed.list(), out);
            }
            throw_if_error(handle.status(), "KVPool.pin");
            return pyb::make_tuple(handle.value(), addrs);
          },
          pyb::arg("keys"), pyb::arg("suffix") = std::string())
      .def(
          "unpin",
          [](Pool& pool, uint32_t handle) {
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.unpin(handle);
            }
            throw_if_error(st, "KVPool.unpin");
          },
          pyb::arg("handle"))
      .def(
          "page_address",
          [](Pool& pool, uint32_t slot) {
            auto addr = pool.page_address(slot);
            throw_if_error(addr.status(), "KVPool.page_address");
            return reinterpret_cast<uint64_t>(addr.value());
          },
          pyb::arg("slot"))
      .def(
          "commit",
          [](Pool& pool, const U32Array& slots) {
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.commit(slots.data(), static_cast<size_t>(slots.size()));
            }
            throw_if_error(st, "KVPool.commit");
          },
          pyb::arg("slots"))
      .def(
          "abort",
          [](Pool& pool, const U32Array& slots) {
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.abort(slots.data(), static_cast<size_t>(slots.size()));
            }
            throw_if_error(st, "KVPool.abort");
          },
          pyb::arg("slots"))
      .def(
          "remove",
          [](Pool& pool, const pyb::handle& keys) {
            PackedKeys packed = pack_keys(keys);
            size_t removed = 0;
            Status st;
            {
              pyb::gil_scoped_release release;
              st = pool.remove(packed.list(), &removed);
            }
            throw_if_error(st, "KVPool.remove");
            return removed;
          },
          pyb::arg("keys"))
      .def("clear",
           [](Pool& pool) {
             size_t removed = 0;
             Status st;
             {
               pyb::gil_scoped_release release;
               st = pool.clear(&removed);
             }
             throw_if_error(st, "KVPool.clear");
             return removed;
           })
      .def("reap",
           [](Pool& pool) {
             size_t reaped = 0;
             Status st;
             {
               pyb::gil_scoped_release release;
               st = pool.reap(&reaped);
             }
             throw_if_error(st, "KVPool.reap");
             return reaped;
           })
      .def("stats",
           [](Pool& pool) {
             StatusOr<kvpool::PoolStats> s = Status();
             {
               pyb::gil_scoped_release release;
               s = pool.stats();
             }
             throw_if_error(s.status(), "KVPool.stats");
             return stats_dict(s.value());
           })
      .def("close_segment",
           [](Pool& pool) { throw_if_error(pool.close_segment(), "KVPool.close_segment"); });
  m.attr("KVPOOL_NO_SLOT") = kvpool::kNone;
}

}  // namespace banaserve::py

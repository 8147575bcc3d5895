// SPDX-License-Identifier: Apache-2.0
// Bindings of cpp/transfer. Argument conversion and GIL handling only; the Python façade
// (banaserve_ext/transfer.py) turns these into the public, typed API.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../transfer/baseline/raw_tcp.h"
#include "banaserve/transfer/engine.h"
#include "errors.h"

namespace pyb = pybind11;
using namespace pybind11::literals;

namespace banaserve::py {
namespace {

using transfer::Batch;
using transfer::Device;
using transfer::Engine;
using transfer::EngineConfig;
using transfer::EngineMetadata;
using transfer::MemoryKind;
using transfer::PreparedList;
using transfer::RecvStream;
using transfer::RegionInfo;
using transfer::SendStream;

using IndexArray = pyb::array_t<int64_t, pyb::array::c_style>;
using U64Array = pyb::array_t<uint64_t, pyb::array::c_style>;

template <typename T>
T value_or_throw(StatusOr<T> result, const char* where) {
  throw_if_error(result.status(), where);
  return std::move(result).value();
}

pyb::dict region_to_dict(const RegionInfo& r) {
  return pyb::dict("id"_a = r.id, "addr"_a = r.addr, "nbytes"_a = r.nbytes,
                   "device_kind"_a = static_cast<int>(r.device.kind), "device_id"_a = r.device.id,
                   "shm_fd"_a = r.shm_fd, "shm_offset"_a = r.shm_offset,
                   "ipc_handle"_a = pyb::bytes(r.ipc_handle), "ipc_offset"_a = r.ipc_offset,
                   "rkey"_a = pyb::bytes(r.rkey));
}

// Optional metadata fields: absent in metadata from older peers.
std::string bytes_or_empty(const pyb::dict& d, const char* key) {
  return d.contains(key) ? d[key].cast<std::string>() : std::string();
}

RegionInfo region_from_dict(const pyb::dict& d) {
  RegionInfo r;
  r.id = d["id"].cast<uint64_t>();
  r.addr = d["addr"].cast<uint64_t>();
  r.nbytes = d["nbytes"].cast<uint64_t>();
  r.device.kind = static_cast<MemoryKind>(d["device_kind"].cast<int>());
  r.device.id = d["device_id"].cast<int32_t>();
  r.shm_fd = d["shm_fd"].cast<int32_t>();
  r.shm_offset = d["shm_offset"].cast<uint64_t>();
  r.ipc_handle = bytes_or_empty(d, "ipc_handle");
  r.ipc_offset = d.contains("ipc_offset") ? d["ipc_offset"].cast<uint64_t>() : 0;
  r.rkey = bytes_or_empty(d, "rkey");
  return r;
}

pyb::dict metadata_to_dict(const EngineMetadata& md) {
  pyb::list regions;
  for (const auto& r : md.regions) regions.append(region_to_dict(r));
  return pyb::dict("engine_id"_a = md.engine_id, "host_id"_a = md.host_id, "pid"_a = md.pid,
                   "tcp_host"_a = md.tcp_host, "tcp_port"_a = md.tcp_port,
                   "control_fd"_a = md.control_fd, "ucx_address"_a = pyb::bytes(md.ucx_address),
                   "regions"_a = regions);
}

EngineMetadata metadata_from_dict(const pyb::dict& d) {
  EngineMetadata md;
  md.engine_id = d["engine_id"].cast<std::string>();
  md.host_id = d["host_id"].cast<std::string>();
  md.pid = d["pid"].cast<int32_t>();
  md.tcp_host = d["tcp_host"].cast<std::string>();
  md.tcp_port = d["tcp_port"].cast<uint16_t>();
  md.control_fd = d["control_fd"].cast<int32_t>();
  md.ucx_address = bytes_or_empty(d, "ucx_address");
  for (auto item : d["regions"].cast<pyb::list>()) {
    md.regions.push_back(region_from_dict(item.cast<pyb::dict>()));
  }
  return md;
}

Device device_of(int kind, int id) {
  if (kind != 0 && kind != 1) throw_if_error(BANASERVE_INVALID("device kind must be 0 (host) or 1 (cuda)"), "device");
  return Device{static_cast<MemoryKind>(kind), id};
}

// Python-visible engine: owns the C++ Engine; config is stored, start() acts.
class PyEngine {
 public:
  PyEngine(EngineConfig config, transfer::FaultSpec fault)
      : engine_(std::make_unique<Engine>(std::move(config))) {
    engine_->set_fault(fault);
  }

  Engine& get() { return *engine_; }

 private:
  std::unique_ptr<Engine> engine_;
};

// Runs wait() without the GIL. True when done; false when the wait timed out while the object is
// still running (it goes on); raises the failure otherwise (a missed deadline included).
template <typename Wait, typename StateOf>
bool wait_released(Wait wait, StateOf state_of, const char* where) {
  Status st;
  {
    pyb::gil_scoped_release release;
    st = wait();
  }
  if (st.code() == StatusCode::kTimeout && !transfer::is_terminal(state_of())) return false;
  throw_if_error(st, where);
  return true;
}

std::vector<int64_t> to_vector(const IndexArray& a) {
  if (a.ndim() != 1) throw_if_error(BANASERVE_INVALID("index arrays must be 1-D"), "index array");
  return std::vector<int64_t>(a.data(), a.data() + a.shape(0));
}

}  // namespace

void bind_transfer(pyb::module_& m) {
  pyb::class_<EngineConfig>(m, "EngineConfig")
      .def(pyb::init<>())
      .def_readwrite("engine_id", &EngineConfig::engine_id)
      .def_readwrite("tcp_host", &EngineConfig::tcp_host)
      .def_readwrite("tcp_port", &EngineConfig::tcp_port)
      .def_readwrite("backends", &EngineConfig::backends)
      .def_readwrite("tcp_lanes", &EngineConfig::tcp_lanes)
      .def_readwrite("copy_threads", &EngineConfig::copy_threads)
      .def_readwrite("default_timeout_ms", &EngineConfig::default_timeout_ms)
      .def_readwrite("force_backend", &EngineConfig::force_backend)
      .def_readwrite("peer_check_interval_ms", &EngineConfig::peer_check_interval_ms);

  pyb::class_<transfer::FaultSpec>(m, "FaultSpec")
      .def(pyb::init<>())
      .def_readwrite("fail_after_posts", &transfer::FaultSpec::fail_after_posts)
      .def_readwrite("delay_ms", &transfer::FaultSpec::delay_ms)
      .def_readwrite("drop", &transfer::FaultSpec::drop);

  m.def("available_backends", &transfer::available_transports,
        "Backends compiled into this build, in the order an engine considers them.");
  m.def("backend_names", &transfer::backend_names,
        "Every transfer backend this library knows, compiled into this build or not.");
  m.def("default_backends", &transfer::default_backends,
        "Backends an engine starts besides local when its configuration does not choose.");
  m.def(
      "baseline_tcp_round_trips_us",
      [](uint64_t nbytes, int iterations) {
        StatusOr<std::vector<double>> r = [&] {
          pyb::gil_scoped_release release;
          return transfer::baseline::tcp_round_trips_us(nbytes, iterations);
        }();
        return value_or_throw(std::move(r), "baseline_tcp_round_trips_us");
      },
      "nbytes"_a, "iterations"_a,
      "Round trips (us) of an nbytes request + 8-byte reply over loopback TCP (benchmark baseline).");

  pyb::class_<PreparedList, std::shared_ptr<PreparedList>>(m, "PreparedList")
      .def_property_readonly("num_entries", &PreparedList::num_entries)
      .def_property_readonly("num_buffers", &PreparedList::num_buffers)
      .def_property_readonly("is_layout",
                             [](const PreparedList& p) { return p.kind == PreparedList::Kind::kLayout; })
      .def_property_readonly("peer", [](const PreparedList& p) { return p.owner; })
      .def_property_readonly("item_nbytes", [](const PreparedList& p) { return p.item_nbytes; });

  pyb::class_<Batch, std::shared_ptr<Batch>>(m, "Batch")
      .def_property_readonly("id", &Batch::id)
      .def_property_readonly("nbytes", &Batch::nbytes)
      .def_property_readonly("peer", &Batch::peer_id)
      .def_property_readonly("state", [](const Batch& b) { return static_cast<int>(b.state()); })
      .def_property_readonly("error", [](const Batch& b) { return b.status().to_string(); })
      .def(
          "wait",
          [](Batch& b, int64_t timeout_ms) {
            return wait_released([&] { return b.wait(timeout_ms); },
                                 [&] { return b.state(); }, "transfer");
          },
          "timeout_ms"_a)
      .def("cancel", &Batch::cancel);

  pyb::class_<transfer::ReadyFence, std::shared_ptr<transfer::ReadyFence>>(m, "ReadyFence")
      .def("query", [](transfer::ReadyFence& f) { return value_or_throw(f.query(), "fence"); });
  pyb::class_<transfer::HostFence, transfer::ReadyFence, std::shared_ptr<transfer::HostFence>>(
      m, "HostFence")
      .def(pyb::init<>())
      .def("signal", [](transfer::HostFence& f) { f.signal(); })
      .def(
          "fail",
          [](transfer::HostFence& f, const std::string& why) {
            f.signal(BANASERVE_STATUS(StatusCode::kInternal, why));
          },
          "why"_a);
  m.def(
      "cuda_event_fence",
      [](uint64_t event_handle) {
        return value_or_throw(transfer::make_device_event_fence(event_handle), "cuda_event_fence");
      },
      "event_handle"_a, "A fence on a recorded cudaEvent_t (its integer handle).");

  pyb::class_<SendStream, std::shared_ptr<SendStream>>(m, "SendStream")
      .def_property_readonly("transfer_id", &SendStream::transfer_id)
      .def_property_readonly("num_layers", &SendStream::num_layers)
      .def_property_readonly("layers_posted", &SendStream::layers_posted)
      .def_property_readonly("state", [](const SendStream& s) { return static_cast<int>(s.state()); })
      .def(
          "mark_layer_ready",
          [](SendStream& s, uint32_t layer) {
            Status st;
            {
              pyb::gil_scoped_release release;
              st = s.mark_layer_ready(layer);
            }
            throw_if_error(st, "mark_layer_ready");
          },
          "layer"_a)
      .def(
          "mark_layer_ready_after",
          [](SendStream& s, uint32_t layer, std::shared_ptr<transfer::ReadyFence> fence) {
            throw_if_error(s.mark_layer_ready_after(layer, std::move(fence)),
                           "mark_layer_ready_after");
          },
          "layer"_a, "fence"_a)
      .def(
          "wait",
          [](SendStream& s, int64_t timeout_ms) {
            return wait_released([&] { return s.wait(timeout_ms); },
                                 [&] { return s.state(); }, "send stream");
          },
          "timeout_ms"_a)
      .def("cancel", &SendStream::cancel);

  pyb::class_<RecvStream, std::shared_ptr<RecvStream>>(m, "RecvStream")
      .def_property_readonly("transfer_id", &RecvStream::transfer_id)
      .def_property_readonly("num_layers", &RecvStream::num_layers)
      .def_property_readonly("layers_done", &RecvStream::layers_done)
      .def_property_readonly("state", [](const RecvStream& s) { return static_cast<int>(s.state()); })
      .def("layer_done", &RecvStream::layer_done, "layer"_a)
      .def(
          "wait_layer",
          [](RecvStream& s, uint32_t layer, int64_t timeout_ms) {
            return wait_released([&] { return s.wait_layer(layer, timeout_ms); },
                                 [&] { return s.state(); }, "receive stream");
          },
          "layer"_a, "timeout_ms"_a)
      .def(
          "wait_all",
          [](RecvStream& s, int64_t timeout_ms) {
            return wait_released([&] { return s.wait_all(timeout_ms); },
                                 [&] { return s.state(); }, "receive stream");
          },
          "timeout_ms"_a)
      .def("cancel", &RecvStream::cancel);

  pyb::class_<PyEngine>(m, "Engine")
      .def(pyb::init<EngineConfig, transfer::FaultSpec>(), "config"_a, "fault"_a)
      .def("start", [](PyEngine& e) {
        Status st;
        {
          pyb::gil_scoped_release release;
          st = e.get().start();
        }
        throw_if_error(st, "engine.start");
      })
      .def("stop", [](PyEngine& e) {
        pyb::gil_scoped_release release;
        e.get().stop();
      })
      .def_property_readonly("started", [](PyEngine& e) { return e.get().started(); })
      .def_property_readonly("engine_id", [](PyEngine& e) { return e.get().engine_id(); })
      .def("metadata", [](PyEngine& e) { return metadata_to_dict(e.get().metadata()); })
      .def(
          "register_memory",
          [](PyEngine& e, uint64_t addr, uint64_t nbytes, int device_kind, int device_id) {
            return region_to_dict(value_or_throw(
                e.get().register_memory(addr, nbytes, device_of(device_kind, device_id)), "register"));
          },
          "addr"_a, "nbytes"_a, "device_kind"_a = 0, "device_id"_a = 0)
      .def(
          "allocate",
          [](PyEngine& e, uint64_t nbytes) {
            StatusOr<RegionInfo> r = [&] {
              pyb::gil_scoped_release release;  // pre-faulting 1 GiB takes ~0.3 s
              return e.get().allocate(nbytes);
            }();
            return region_to_dict(value_or_throw(std::move(r), "allocate"));
          },
          "nbytes"_a)
      .def(
          "unregister",
          [](PyEngine& e, uint64_t region_id) {
            throw_if_error(e.get().unregister_memory(region_id), "unregister");
          },
          "region_id"_a)
      .def(
          "add_peer",
          [](PyEngine& e, const pyb::dict& md) {
            EngineMetadata meta = metadata_from_dict(md);
            StatusOr<std::string> r = [&] {
              pyb::gil_scoped_release release;
              return e.get().add_peer(meta);
            }();
            return value_or_throw(std::move(r), "add_peer");
          },
          "metadata"_a)
      .def(
          "remove_peer",
          [](PyEngine& e, const std::string& id) {
            Status st;
            {
              pyb::gil_scoped_release release;
              st = e.get().remove_peer(id);
            }
            throw_if_error(st, "remove_peer");
          },
          "engine_id"_a)
      .def(
          "peer_backend",
          [](PyEngine& e, const std::string& id) {
            return value_or_throw(e.get().peer_backend(id), "peer_backend");
          },
          "engine_id"_a)
      .def(
          "peer_route",
          [](PyEngine& e, const std::string& id) {
            return value_or_throw(e.get().peer_route(id), "peer_route");
          },
          "engine_id"_a)
      .def("peers", [](PyEngine& e) { return e.get().peers(); })
      .def(
          "prepare_descs",
          [](PyEngine& e, const std::string& peer, const U64Array& table, int device_kind,
             int device_id) {
            if (table.ndim() != 2 || table.shape(1) != 2) {
              throw_if_error(BANASERVE_INVALID("descriptor table must have shape (N, 2): addr, nbytes"),
                             "prepare");
            }
            const size_t n = static_cast<size_t>(table.shape(0));
            std::vector<uint64_t> addrs(n), lens(n);
            const uint64_t* p = table.data();
            for (size_t i = 0; i < n; ++i) {
              addrs[i] = p[2 * i];
              lens[i] = p[2 * i + 1];
            }
            const Device dev = device_of(device_kind, device_id);
            StatusOr<std::shared_ptr<const PreparedList>> r = [&] {
              pyb::gil_scoped_release release;
              return e.get().prepare_descs(peer, addrs.data(), lens.data(), n, dev);
            }();
            return std::const_pointer_cast<PreparedList>(value_or_throw(std::move(r), "prepare"));
          },
          "peer"_a, "table"_a, "device_kind"_a = 0, "device_id"_a = 0)
      .def(
          "prepare_layout",
          [](PyEngine& e, const std::string& peer, const U64Array& bases, uint64_t item_nbytes,
             uint64_t num_items, int device_kind, int device_id) {
            if (bases.ndim() != 1) {
              throw_if_error(BANASERVE_INVALID("layout bases must be a 1-D array"), "prepare_layout");
            }
            const Device dev = device_of(device_kind, device_id);
            const uint64_t* p = bases.data();
            const size_t nb = static_cast<size_t>(bases.shape(0));
            StatusOr<std::shared_ptr<const PreparedList>> r = [&] {
              pyb::gil_scoped_release release;
              return e.get().prepare_layout(peer, p, nb, item_nbytes, num_items, dev);
            }();
            return std::const_pointer_cast<PreparedList>(value_or_throw(std::move(r), "prepare_layout"));
          },
          "peer"_a, "bases"_a, "item_nbytes"_a, "num_items"_a, "device_kind"_a = 0,
          "device_id"_a = 0)
      .def(
          "submit",
          [](PyEngine& e, int op, const std::string& peer, const PreparedList& local,
             const IndexArray& local_idx, const PreparedList& remote, const IndexArray& remote_idx,
             uint32_t buf_begin, uint32_t buf_end, uint64_t transfer_id, uint32_t layer,
             uint32_t num_layers, int64_t timeout_ms) {
            if (op != 0 && op != 1) throw_if_error(BANASERVE_INVALID("op must be WRITE (0) or READ (1)"), "submit");
            if (local_idx.ndim() != 1 || remote_idx.ndim() != 1 ||
                local_idx.shape(0) != remote_idx.shape(0)) {
              throw_if_error(BANASERVE_INVALID("index arrays must be 1-D and of equal length"), "submit");
            }
            Engine::SubmitArgs a;
            a.op = static_cast<transfer::Op>(op);
            a.peer_id = peer;
            a.local = &local;
            a.local_idx = local_idx.data();
            a.remote = &remote;
            a.remote_idx = remote_idx.data();
            a.n = static_cast<size_t>(local_idx.shape(0));
            a.buf_begin = buf_begin;
            a.buf_end = buf_end;
            a.tag = transfer::NotifyTag{transfer_id, layer, num_layers};
            a.timeout_ms = timeout_ms;
            StatusOr<std::shared_ptr<Batch>> r = [&] {
              pyb::gil_scoped_release release;
              return e.get().submit(a);
            }();
            return value_or_throw(std::move(r), "submit");
          },
          "op"_a, "peer"_a, "local"_a, "local_idx"_a, "remote"_a, "remote_idx"_a,
          "buf_begin"_a = 0, "buf_end"_a = UINT32_MAX, "transfer_id"_a = 0, "layer"_a = 0,
          "num_layers"_a = 0, "timeout_ms"_a = -1)
      .def(
          "open_stream",
          [](PyEngine& e, const std::string& peer, uint64_t transfer_id, uint32_t num_layers,
             std::shared_ptr<PreparedList> local, const IndexArray& local_idx,
             std::shared_ptr<PreparedList> remote, const IndexArray& remote_idx,
             uint32_t buffers_per_layer, int64_t timeout_ms) {
            return value_or_throw(
                e.get().open_stream(peer, transfer_id, num_layers, local, to_vector(local_idx),
                                    remote, to_vector(remote_idx), buffers_per_layer, timeout_ms),
                "open_stream");
          },
          "peer"_a, "transfer_id"_a, "num_layers"_a, "local"_a, "local_idx"_a, "remote"_a,
          "remote_idx"_a, "buffers_per_layer"_a, "timeout_ms"_a = -1)
      .def(
          "expect",
          [](PyEngine& e, uint64_t transfer_id, uint32_t num_layers, const std::string& from,
             int64_t timeout_ms) {
            if (transfer_id == 0) throw_if_error(BANASERVE_INVALID("transfer_id 0 is reserved"), "expect");
            return e.get().expect(transfer_id, num_layers, from, timeout_ms);
          },
          "transfer_id"_a, "num_layers"_a, "from_engine"_a = "", "timeout_ms"_a = -1)
      .def("release_stream", [](PyEngine& e, uint64_t id) { e.get().release_stream(id); })
      .def("stats", [](PyEngine& e) {
        const auto s = e.get().stats();
        return pyb::dict("batches_submitted"_a = s.batches_submitted, "batches_done"_a = s.batches_done,
                         "batches_failed"_a = s.batches_failed,
                         "batches_cancelled"_a = s.batches_cancelled,
                         "bytes_written"_a = s.bytes_written, "bytes_read"_a = s.bytes_read,
                         "bytes_served"_a = s.bytes_served, "frames_rejected"_a = s.frames_rejected,
                         "connections_dropped"_a = s.connections_dropped,
                         "peers_lost"_a = s.peers_lost, "registered_nbytes"_a = s.registered_nbytes,
                         "regions"_a = s.regions, "peers"_a = s.peers,
                         "inbox_streams"_a = s.inbox_streams);
      });
}

}  // namespace banaserve::py

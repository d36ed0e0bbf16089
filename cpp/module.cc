// Python bindings: a KServe v2 gRPC server that runs on its own C++ threads, and a C++ load
// generator for benchmarks. Every call that blocks releases the GIL; the request path never takes it.
#include <grpcpp/grpcpp.h>
#include <google/protobuf/stubs/logging.h>
#include <grpcpp/health_check_service_interface.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ctr_model.h"
#include "forwarder.h"
#include "inference_service.h"
#include "shard_router.h"
#include "shard_server.h"

namespace py = pybind11;

namespace servefleet::direct {
namespace {

class DirectServer {
 public:
  DirectServer() : service_(&stats_) {}
  ~DirectServer() { Stop(0.0); }

  // Loads (or replaces) the model; safe while serving.
  void LoadModel(const std::string& path, const std::string& name, const std::string& version) {
    if (name.empty()) throw std::invalid_argument("model name must not be empty");
    service_.SetModel(CtrModel::Load(path), name, version);
  }

  // Binds `address` (host:port, port 0 picks a free one) and returns the bound port.
  int Start(const std::string& address, int workers) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (server_) throw std::runtime_error("server already started on port " + std::to_string(port_));
    if (workers < 1 || workers > 256) throw std::invalid_argument("workers must be in [1, 256]");
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service_);
    builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
    builder.SetMaxSendMessageSize(kMaxMessageBytes);
    builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::NUM_CQS, workers);
    builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 1);
    builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, workers);
    auto server = builder.BuildAndStart();
    if (!server || port == 0) throw std::runtime_error("could not listen on " + address);
    server_ = std::move(server);
    port_ = port;
    return port;
  }

  // Stops accepting, lets in-flight RPCs finish for up to grace_s, then cancels the rest.
  void Stop(double grace_s) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!server_) return;
    const auto deadline = std::chrono::system_clock::now() +
                          std::chrono::microseconds(static_cast<int64_t>(std::max(grace_s, 0.0) * 1e6));
    server_->Shutdown(deadline);
    server_->Wait();
    server_.reset();
    port_ = 0;
  }

  bool running() {
    std::lock_guard<std::mutex> lock(mutex_);
    return server_ != nullptr;
  }
  int port() {
    std::lock_guard<std::mutex> lock(mutex_);
    return port_;
  }
  std::string model_name() const { return service_.model_name(); }
  StatsSnapshot stats() const { return stats_.Snapshot(); }
  const Stats& raw_stats() const { return stats_; }

 private:
  Stats stats_;
  InferenceService service_;
  std::mutex mutex_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

struct LoadResult {
  uint64_t requests = 0;
  uint64_t errors = 0;
  double seconds = 0;
  double p50_ms = 0;
  double p99_ms = 0;
  std::string first_error;
};

// `concurrency` threads, each with its own channel, send the same ModelInferRequest back to back
// for `duration_s`. Measures the server, not a Python client's event loop.
LoadResult RunLoad(const std::string& address, const std::string& request_bytes, int concurrency,
                   double duration_s) {
  inference::ModelInferRequest request;
  if (!request.ParseFromString(request_bytes)) throw std::invalid_argument("request_bytes is not a ModelInferRequest");
  if (concurrency < 1) throw std::invalid_argument("concurrency must be >= 1");
  std::vector<std::vector<double>> latencies(concurrency);
  std::vector<uint64_t> errors(concurrency, 0);
  std::vector<std::string> first_errors(concurrency);
  const auto start = std::chrono::steady_clock::now();
  const auto until = start + std::chrono::microseconds(static_cast<int64_t>(duration_s * 1e6));
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
      args.SetMaxReceiveMessageSize(kMaxMessageBytes);
      auto stub = inference::GRPCInferenceService::NewStub(
          grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
      inference::ModelInferResponse response;
      while (std::chrono::steady_clock::now() < until) {
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
        const auto sent = std::chrono::steady_clock::now();
        const grpc::Status status = stub->ModelInfer(&context, request, &response);
        latencies[t].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - sent).count());
        if (!status.ok() && errors[t]++ == 0) first_errors[t] = status.error_message();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  LoadResult result;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<double> all;
  for (int t = 0; t < concurrency; ++t) {
    all.insert(all.end(), latencies[t].begin(), latencies[t].end());
    result.errors += errors[t];
    if (result.first_error.empty()) result.first_error = first_errors[t];
  }
  result.requests = all.size();
  if (!all.empty()) {
    std::sort(all.begin(), all.end());
    result.p50_ms = all[static_cast<size_t>(0.50 * (all.size() - 1))];
    result.p99_ms = all[static_cast<size_t>(0.99 * (all.size() - 1))];
  }
  return result;
}

py::dict ToDict(const StatsSnapshot& s) {
  py::dict d;
  d["requests"] = s.requests;
  d["errors"] = s.errors;
  d["infer_requests"] = s.infer_requests;
  d["rows"] = s.rows;
  d["in_flight"] = s.in_flight;
  d["mean_latency_us"] = s.mean_latency_us;
  d["p50_latency_us"] = s.p50_latency_us;
  d["p99_latency_us"] = s.p99_latency_us;
  return d;
}

py::dict CallStatsDict(const CallStats& s) {
  py::dict d;
  py::dict codes;
  for (size_t c = 0; c < s.codes.size(); ++c)
    if (const auto n = s.codes[c].load(std::memory_order_relaxed)) codes[py::int_(c)] = n;
  std::vector<uint64_t> buckets(s.bounds_ns.size() + 1);
  for (size_t i = 0; i < buckets.size(); ++i) buckets[i] = s.buckets[i].load(std::memory_order_relaxed);
  d["codes"] = codes;
  d["buckets"] = buckets;
  d["latency_s"] = static_cast<double>(s.latency_ns.load(std::memory_order_relaxed)) / 1e9;
  d["in_flight"] = s.in_flight.load(std::memory_order_relaxed);
  d["relayed"] = s.relayed.load(std::memory_order_relaxed);
  d["retried"] = s.retried.load(std::memory_order_relaxed);
  return d;
}

// Per shard of the current table: what shard_router.py's ShardPool.stats() reports.
py::list ShardStatsList(const ShardRouter& router) {
  py::list out;
  const auto table = router.table();
  if (!table) return out;
  for (const auto& pool : table->pools) {
    py::dict d, p50;
    std::lock_guard<std::mutex> lock(pool->mu);
    d["lookups"] = pool->lookups;
    d["hedges"] = pool->hedges;
    d["hedge_wins"] = pool->hedge_wins;
    d["retries"] = pool->retries;
    d["hedge_delay_ms"] = std::round(pool->HedgeDelay(router.hedge_default_s) * 1e6) / 1e3;
    for (const auto& [name, window] : pool->latencies) {
      if (window.empty()) continue;
      std::vector<double> ordered(window.begin(), window.end());
      std::sort(ordered.begin(), ordered.end());
      p50[py::str(name)] = std::round(ordered[ordered.size() / 2] * 1e6) / 1e3;
    }
    d["p50_ms"] = p50;
    out.append(d);
  }
  return out;
}

}  // namespace
}  // namespace servefleet::direct

PYBIND11_MODULE(_direct, m) {
  // Malformed client input (e.g. invalid UTF-8 in a string field) is answered with a status; the
  // library's per-message error log would only flood the actor's stderr.
  google::protobuf::SetLogHandler(nullptr);
  using servefleet::direct::DirectServer;
  using servefleet::direct::LoadResult;
  m.doc() = "C++ KServe v2 gRPC server for a factorization-machine CTR model (servefleet direct ingress).";
  m.attr("INPUT_NAME") = servefleet::direct::kInputName;
  m.attr("OUTPUT_NAME") = servefleet::direct::kOutputName;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  py::class_<DirectServer>(m, "DirectServer")
      .def(py::init<>())
      .def("load_model", &DirectServer::LoadModel, py::arg("path"), py::arg("name"), py::arg("version") = "1",
           py::call_guard<py::gil_scoped_release>())
      .def("start", &DirectServer::Start, py::arg("address"), py::arg("workers") = 2,
           py::call_guard<py::gil_scoped_release>())
      .def("stop", &DirectServer::Stop, py::arg("grace_s") = 5.0, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const DirectServer& s) { return servefleet::direct::ToDict(s.stats()); })
      .def(
          "latency_buckets",
          [](const DirectServer& s, const std::vector<uint64_t>& bounds_us) {
            uint64_t sum_us = 0;
            std::vector<uint64_t> counts = s.raw_stats().LatencyBuckets(bounds_us, &sum_us);
            return py::make_tuple(counts, sum_us);
          },
          py::arg("bounds_us"))
      .def_property_readonly("running", &DirectServer::running)
      .def_property_readonly("port", &DirectServer::port)
      .def_property_readonly("model_name", &DirectServer::model_name);
  using servefleet::direct::Forwarder;
  using servefleet::direct::RelayServer;
  py::class_<RelayServer>(m, "RelayServer")
      .def("start", &RelayServer::Start, py::arg("address"), py::arg("fallback"),
           py::call_guard<py::gil_scoped_release>())
      .def("stop", &RelayServer::Stop, py::arg("grace_s") = 5.0, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const RelayServer& s) { return servefleet::direct::CallStatsDict(s.stats); });
  py::class_<Forwarder, RelayServer>(m, "Forwarder")
      .def(py::init<const std::vector<double>&, int>(), py::arg("latency_bounds_s"), py::arg("attempts") = 3)
      .def("set_table", &Forwarder::SetTable, py::arg("model"), py::arg("version"), py::arg("replicas"),
           py::arg("inputs"), py::arg("sample_ratio"), py::call_guard<py::gil_scoped_release>())
      .def("in_flight_on", &Forwarder::in_flight_on, py::arg("name"));
  using servefleet::direct::ShardRouter;
  py::class_<ShardRouter, RelayServer>(m, "ShardRouter")
      .def(py::init<const std::vector<double>&, int, double, double>(), py::arg("latency_bounds_s"),
           py::arg("attempts"), py::arg("hedge_default_s"), py::arg("hedge_budget"))
      .def("set_table", &ShardRouter::SetTable, py::arg("model"), py::arg("version"), py::arg("inputs"),
           py::arg("key_input"), py::arg("output"), py::arg("partitioning"), py::arg("bounds"), py::arg("num_rows"),
           py::arg("fields"), py::arg("dim"), py::arg("bias"), py::arg("shards"), py::arg("method"),
           py::arg("sample_ratio"), py::arg("enabled"), py::call_guard<py::gil_scoped_release>())
      .def("set_hedge_budget", &ShardRouter::SetHedgeBudget, py::arg("budget"))
      .def_property_readonly("hedge_budget", &ShardRouter::hedge_budget)
      .def("owners", &ShardRouter::Owners, py::arg("keys"))
      .def("shard_stats", &servefleet::direct::ShardStatsList);
  using servefleet::direct::ShardServer;
  using Floats = py::array_t<float, py::array::c_style>;
  py::class_<ShardServer, RelayServer>(m, "ShardServer")
      .def(py::init([](const std::vector<double>& latency_bounds_s, const std::string& method, const std::string& name,
                       int capacity, const Floats& linear, const Floats& factors,
                       const py::array_t<int64_t, py::array::c_style>& keys, int64_t lo, double sample_ratio) {
             if (linear.ndim() != 1 || factors.ndim() != 2 || factors.shape(0) != linear.shape(0) ||
                 (keys.size() && (keys.ndim() != 1 || keys.shape(0) != linear.shape(0))))
               throw std::invalid_argument("a part is linear [rows], factors [rows, dim] and (hash) keys [rows]");
             const servefleet::direct::PartView part{linear.data(), factors.data(), keys.size() ? keys.data() : nullptr,
                                                     lo, linear.shape(0), static_cast<uint32_t>(factors.shape(1))};
             return std::make_unique<ShardServer>(latency_bounds_s, method, name, capacity, part, sample_ratio);
           }),
           py::arg("latency_bounds_s"), py::arg("method"), py::arg("name"), py::arg("capacity"),
           py::arg("linear").noconvert(), py::arg("factors").noconvert(), py::arg("keys").noconvert(), py::arg("lo"),
           py::arg("sample_ratio"), py::keep_alive<1, 6>(), py::keep_alive<1, 7>(), py::keep_alive<1, 8>())
      .def("set_enabled", &ShardServer::SetEnabled, py::arg("on"));
  m.def(
      "fm_scores",
      [](float bias, uint32_t fields, uint32_t dim, const py::bytes& rows) {
        // rows: float32 [batch * fields, 1 + dim], each id's row (linear weight, then factors).
        const std::string data = rows;
        const size_t width = (1 + size_t{dim}) * sizeof(float);
        if (fields == 0 || dim == 0 || data.size() % (width * fields))
          throw std::invalid_argument("rows must be float32 [batch * fields, 1 + dim]");
        const size_t batch = data.size() / (width * fields);
        std::vector<float> table(data.size() / sizeof(float)), out(batch);
        std::memcpy(table.data(), data.data(), data.size());
        servefleet::direct::FmScores(
            bias, batch, fields, dim,
            [&](size_t b, uint32_t f) {
              const float* row = table.data() + (b * fields + f) * (1 + size_t{dim});
              return std::pair<float, const float*>(row[0], row + 1);
            },
            out.data());
        return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(float));
      },
      py::arg("bias"), py::arg("fields"), py::arg("dim"), py::arg("rows"),
      "Factorization-machine scores of gathered rows, in numpy's float32 order (the router's merge).");
  m.def(
      "run_load",
      [](const std::string& address, const py::bytes& request, int concurrency, double duration_s) {
        std::string bytes = request;
        LoadResult r;
        {
          py::gil_scoped_release release;
          r = servefleet::direct::RunLoad(address, bytes, concurrency, duration_s);
        }
        py::dict d;
        d["requests"] = r.requests;
        d["errors"] = r.errors;
        d["seconds"] = r.seconds;
        d["rps"] = r.seconds > 0 ? static_cast<double>(r.requests) / r.seconds : 0.0;
        d["p50_ms"] = r.p50_ms;
        d["p99_ms"] = r.p99_ms;
        d["first_error"] = r.first_error;
        return d;
      },
      py::arg("address"), py::arg("request"), py::arg("concurrency"), py::arg("duration_s"));
}

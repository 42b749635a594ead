// llamas._C: argument conversion and nothing else. Each init_* binds one area.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/kernel_table.h"
#include "llamas/allocator.h"
#include "llamas/cpu_features.h"
#include "llamas/cuda.h"
#include "llamas/error.h"
#include "llamas/parallel.h"
#include "llamas/profiler.h"
#include "runtime/kv_cache.h"

namespace py = pybind11;

namespace llamas {
namespace python {
void init_ops(py::module_& m);
void init_model(py::module_& m);
void init_train(py::module_& m);
}  // namespace python
}  // namespace llamas

using namespace llamas;

static py::dict memory_stats_dict() {
  MemoryStats s = cpu_memory_stats();
  py::dict d;
  d["bytes_in_use"] = s.bytes_in_use;
  d["peak_bytes_in_use"] = s.peak_bytes_in_use;
  d["bytes_cached"] = s.bytes_cached;
  d["bytes_reserved"] = s.bytes_reserved;
  d["allocations"] = s.allocations;
  d["cache_hits"] = s.cache_hits;
  d["frees"] = s.frees;
  d["kv_cache_blocks_in_use"] = KvCache::blocks_in_use();
  d["kv_cache_bytes_in_use"] = KvCache::bytes_in_use();
  return d;
}

static py::dict cpu_features_dict() {
  py::dict d;
  int count = 0;
  const char* const* names = cpu_feature_names(&count);
  for (int i = 0; i < count; ++i) d[names[i]] = has_cpu_feature(names[i]);
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "llamas native runtime";
  // pybind11 finds numpy's C API on first use, releasing the GIL around it; a daemon thread that
  // made the process's first array conversion as the interpreter began to exit was ended in
  // there by CPython through pybind11's noexcept destructor (std::terminate, status 134). Find it
  // now, while importing, so no later call takes that path.
  (void)py::array_t<float>(0);
  static py::exception<Error> llamas_error(m, "LlamasError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::set_error(llamas_error, e.what());
    }
  });

  m.def("cuda_available", &cuda_available, "True when llamas was built with the CUDA backend and a GPU is visible.");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Threads used by the CPU kernels.");
  m.def("get_num_threads", &num_threads);
  m.def("memory_stats", &memory_stats_dict, "Caching allocator statistics (bytes in use, peak, hits, ...).");
  m.def("reset_peak_memory", &cpu_reset_peak);
  m.def("empty_cache", &cpu_empty_cache, "Returns the allocator's cached free blocks to the OS.");
  m.def("cpu_features", &cpu_features_dict);
  m.def("cpu_name", &cpu_name);
  m.def("last_level_cache_bytes", &last_level_cache_bytes,
        "The largest CPU cache in bytes (32 MiB when the system does not say): a model whose weights are larger "
        "reads them from memory at every token (Model.weights_streamed).");
  m.def("_arm_cpu_name_from_cpuinfo", &arm_cpu_name_from_cpuinfo, py::arg("cpuinfo"));
  m.def("kernel_variant", [] { return std::string(cpu::kernels().name); });
  m.def("bf16_dot_native", [] { return cpu::kernels().bf16_dot_native(); },
        "Whether bfloat16 compute runs VDPBF16PS with the current kernel variant (else two FMAs a pair).");
  m.def("i8_dot_native", [] { return cpu::kernels().i8_dot_native(); },
        "Whether int8 compute runs VPDPBUSD with the current kernel variant (else plain integer loops).");
  m.def("available_kernel_variants", &cpu::available_variants);
  m.def("set_kernel_variant", &cpu::set_variant, py::arg("name"));
  m.def("profiler_enable", &profiler_enable, py::arg("on"));
  m.def("profiler_reset", &profiler_reset);
  m.def("profiler_entries", [] {
    py::list out;
    for (auto& e : profiler_entries()) out.append(py::make_tuple(e.name, e.region, e.calls, e.seconds));
    return out;
  });

  llamas::python::init_ops(m);
  llamas::python::init_model(m);
  llamas::python::init_train(m);
}

#pragma once
// The GIL released for a scope, as py::gil_scoped_release, but safe when the interpreter exits
// while the scope runs on a daemon thread (an Engine's, or a user's thread inside generate()).
//
// CPython ends such a thread when it takes the GIL back after finalization began: take_gil calls
// pthread_exit, whose forced unwind met pybind11's ~gil_scoped_release, a noexcept destructor,
// so the process aborted ("terminate called without an active exception", status 134) instead
// of exiting with its own status. This guard (1) checks first and, once the interpreter is
// finalizing, parks the thread for good without touching the GIL (Python 3.14 does the same for
// daemon threads); the process's exit ends it; (2) lets the forced unwind pass (its destructor
// may throw) for a thread that began waiting for the GIL just before finalization began.
#include <Python.h>

#include <chrono>
#include <thread>

namespace llamas_python {

inline bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

class ReleaseGil {
 public:
  ReleaseGil() : state_(PyEval_SaveThread()) {}
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;
  ~ReleaseGil() noexcept(false) {
    if (interpreter_finalizing()) {
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    }
    PyEval_RestoreThread(state_);
  }

 private:
  PyThreadState* state_;
};

}  // namespace llamas_python

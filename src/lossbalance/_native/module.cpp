// The Python module of lossbalance's C++ parts (see lossbalance/_native/__init__.py).
#include <torch/python.h>

void bind_capture(pybind11::module_& m);
void bind_update(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_capture(m);
  bind_update(m);
}

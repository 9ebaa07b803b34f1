// The one pybind11 file: maps the forest core (csrc/forest.h) to rstar_fast._core.
//
// Every batch call converts its arguments to contiguous arrays while holding the GIL, then
// releases the GIL for the core's work (which fans out over the forest's thread pool) when the
// batch is large enough to be worth it (see ReleaseGil); before it does, every argument array is
// made memory that no other Python thread can reach (see own), so the core uses exactly what it
// validated.
// Core errors become Python exceptions, one class per failure kind (see errors.h):
//   ForestError(ValueError)
//     UnknownNodeError, ShapeError, InvalidValueError, NodeStateError, CorruptFileError,
//     DTypeError (also a TypeError), InternalError
// and file-system failures become OSError (FileNotFoundError etc.) with the path.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "edit_distance.h"
#include "forest.h"

namespace py = pybind11;
using namespace rstar;

namespace {

// Wrong dtype or not array-like: raised by the binding only (the core takes typed pointers).
class DTypeError : public ForestError {
 public:
  using ForestError::ForestError;
};

PyObject* g_forest_error = nullptr;
PyObject* g_unknown_node_error = nullptr;
PyObject* g_shape_error = nullptr;
PyObject* g_invalid_value_error = nullptr;
PyObject* g_node_state_error = nullptr;
PyObject* g_corrupt_file_error = nullptr;
PyObject* g_dtype_error = nullptr;
PyObject* g_internal_error = nullptr;

PyObject* new_exception(py::module_& m, const char* name, PyObject* bases, const char* doc) {
  const std::string qualified = std::string("rstar_fast._core.") + name;
  PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  if (cls == nullptr) throw py::error_already_set();
  m.add_object(name, py::handle(cls));  // the module keeps the class alive
  return cls;
}

// Releases the GIL for a batch of at least kReleaseGilMin nodes. A short call gains nothing
// from dropping it and can lose much: another busy Python thread (an executor's I/O loop, a
// grader) takes the GIL, and getting it back can take up to the interpreter's switch interval
// (5 ms), a thousand times the call's own work. The search makes many one-node calls.
constexpr int64_t kReleaseGilMin = 64;

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

// Makes an argument array binding-owned memory. The core validates its input and then uses it;
// with the GIL released another Python thread could change the caller's array in between (an
// id the core checked becomes one past the forest, a count no longer adds up) and the core
// would read or write out of bounds. An array that the conversion made (from a list, or by a
// cast) owns its data and is referenced by the binding alone: it stays as it is. Anything else,
// the caller's own array or a view of someone's memory, is copied.
template <typename T>
void own(Array<T>& a) {
  if (a.ref_count() == 1 && a.owndata()) return;
  Array<T> copy(a.size());
  if (a.size() > 0) std::memcpy(copy.mutable_data(), a.data(), sizeof(T) * static_cast<size_t>(a.size()));
  a = std::move(copy);
}
template <typename T>
void own(std::optional<Array<T>>& a) {
  if (a) own(*a);
}

// Releases the GIL for a batch of at least kReleaseGilMin items, after making each of args (the
// call's argument arrays) binding-owned: take their data() pointers only after this.
class ReleaseGil {
 public:
  template <typename... Arrays>
  explicit ReleaseGil(int64_t batch, Arrays&... args) {
    if (batch < kReleaseGilMin) return;
    (own(args), ...);
    release_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> release_;
};

// np.asarray(obj) as a 1-D contiguous array of T. Integer targets take integer dtypes only,
// float targets take float or integer dtypes; an empty input may have any dtype.
// A list or tuple of Python ints (floats too, for float targets) straight into an array: the
// driver passes short lists on every expansion, and numpy's generic conversion of a list
// costs more than the forest's work on it. Anything else returns nullopt (numpy's path).
template <typename T>
std::optional<Array<T>> from_number_list(py::handle obj) {
  if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr())) return std::nullopt;
  PyObject* seq = obj.ptr();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  Array<T> out(n);
  T* dst = out.mutable_data();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = items[i];
    if (PyLong_CheckExact(v)) {
      int overflow = 0;
      const long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
      if (overflow != 0) return std::nullopt;  // numpy reports it
      if constexpr (std::is_integral_v<T>) {
        if (x < static_cast<long long>(std::numeric_limits<T>::min()) ||
            x > static_cast<long long>(std::numeric_limits<T>::max()))
          return std::nullopt;  // numpy's conversion decides
      }
      dst[i] = static_cast<T>(x);
    } else if (!std::is_integral_v<T> && PyFloat_CheckExact(v)) {
      const double x = PyFloat_AS_DOUBLE(v);
      if constexpr (std::is_same_v<T, float>) {
        if (std::isfinite(x) && std::fabs(x) > std::numeric_limits<float>::max())
          return std::nullopt;  // as_array names it
      }
      dst[i] = static_cast<T>(x);
    } else {
      return std::nullopt;  // bools, numpy scalars, strings...: numpy's rules and errors
    }
  }
  return out;
}

template <typename T>
Array<T> as_array(py::handle obj, const char* name) {
  if (auto fast = from_number_list<T>(obj)) return std::move(*fast);
  py::array arr = py::array::ensure(obj);
  if (!arr) throw DTypeError(std::string(name) + " must be a 1-D array or sequence of numbers");
  const char kind = arr.dtype().kind();
  const bool is_int = kind == 'i' || kind == 'u';
  const bool ok = std::is_integral_v<T> ? is_int : (is_int || kind == 'f');
  // None or a str is no array of numbers at all: its kind says so, not its 0 dimensions
  if (arr.ndim() == 0 && !ok)
    throw DTypeError(std::string(name) + " must be a 1-D array or sequence of numbers, got " +
                     py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  if (arr.ndim() != 1)
    throw ShapeError(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
  if (arr.size() > 0 && !ok)
    throw DTypeError(std::string(name) + " must be " + (std::is_integral_v<T> ? "an integer" : "a float") +
                     " array, got dtype " + py::str(arr.dtype()).cast<std::string>());
  if constexpr (std::is_same_v<T, int64_t>) {
    // uint64 values past int64 would wrap to negative ids: name the value as given
    if (kind == 'u' && arr.itemsize() == 8) {
      auto u = py::array_t<uint64_t, py::array::forcecast>::ensure(arr);
      const uint64_t* v = u.data();
      for (py::ssize_t i = 0; i < u.size(); ++i)
        if (v[i] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
          throw InvalidValueError(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(v[i]) +
                                  " is out of the int64 range");
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    // a finite double past float32's range would become inf, and be called "not finite"
    if (kind == 'f' && arr.itemsize() > 4) {
      auto d = py::array_t<double, py::array::forcecast>::ensure(arr);
      const double* v = d.data();
      for (py::ssize_t i = 0; i < d.size(); ++i)
        if (std::isfinite(v[i]) && std::fabs(v[i]) > std::numeric_limits<float>::max())
          throw InvalidValueError(std::string(name) + "[" + std::to_string(i) + "] = " +
                                  py::repr(py::float_(v[i])).cast<std::string>() +
                                  " is outside float32's range (magnitude at most 3.4e38)");
    }
  }
  return Array<T>::ensure(arr);
}

void check_same_length(int64_t a, const char* an, int64_t b, const char* bn) {
  if (a != b)
    throw ShapeError(std::string("len(") + an + ") = " + std::to_string(a) + " but len(" + bn + ") = " +
                     std::to_string(b));
}

// Hands a vector to numpy without copying it.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  if (v.empty()) return py::array_t<T>(0);
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(heap->size()), heap->data(), owner);
}

py::list to_str_list(const Ragged<char>& r) {
  const size_t m = r.offsets.empty() ? 0 : r.offsets.size() - 1;
  py::list out(m);
  for (size_t i = 0; i < m; ++i) {
    PyObject* s = PyUnicode_DecodeUTF8(r.data.data() + r.offsets[i], r.offsets[i + 1] - r.offsets[i], "replace");
    if (s == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), static_cast<py::ssize_t>(i), s);
  }
  return out;
}

// Checks a ragged offsets array (m + 1 entries, non-decreasing, within [0, size]).
void check_offsets(const Array<int64_t>& offsets, int64_t m, int64_t size, const char* data_name) {
  if (offsets.size() != m + 1)
    throw ShapeError("len(offsets) = " + std::to_string(offsets.size()) + " but it must be len(nodes) + 1 = " +
                     std::to_string(m + 1));
  const int64_t* o = offsets.data();
  for (int64_t i = 0; i <= m; ++i) {
    if (o[i] < 0 || o[i] > size || (i > 0 && o[i] < o[i - 1]))
      throw InvalidValueError("offsets[" + std::to_string(i) + "] = " + std::to_string(o[i]) +
                              " is out of order or outside len(" + data_name + ") = " + std::to_string(size));
  }
}

// Step texts for m nodes: a sequence of str/bytes, or UTF-8 bytes with m + 1 offsets. The
// pointers stay valid while the TextArgs lives (it holds the Python objects).
struct TextArgs {
  std::vector<const char*> ptrs;
  std::vector<int64_t> lens;
  std::vector<py::object> keep;
  py::buffer_info data;
};

// A sequence of per-node payloads (texts, tokens), or DTypeError naming the argument.
py::sequence payload_sequence(py::handle obj, const char* name, const char* item_kind) {
  if (!PySequence_Check(obj.ptr()) || PyUnicode_Check(obj.ptr()) || PyBytes_Check(obj.ptr()))
    throw DTypeError(std::string(name) + " must be a sequence of " + item_kind + ", got " +
                     py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  return py::reinterpret_borrow<py::sequence>(obj);
}

// `count_name` names what the texts pair with (len(nodes), or len(values) in expand).
TextArgs parse_texts(py::handle texts, py::handle offsets, int64_t m, const char* count_name) {
  TextArgs t;
  t.ptrs.resize(static_cast<size_t>(m));
  t.lens.resize(static_cast<size_t>(m));
  if (offsets.is_none()) {
    py::sequence seq = payload_sequence(texts, "texts", "str (or bytes data with offsets)");
    check_same_length(m, count_name, static_cast<int64_t>(py::len(seq)), "texts");
    t.keep.reserve(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) {
      py::object s = seq[static_cast<size_t>(i)];
      Py_ssize_t len = 0;
      const char* p = nullptr;
      if (PyUnicode_Check(s.ptr())) {
        p = PyUnicode_AsUTF8AndSize(s.ptr(), &len);
        if (p == nullptr) {  // a lone surrogate has no UTF-8: name the text it is in
          py::error_already_set why;
          throw InvalidValueError("texts[" + std::to_string(i) + "] cannot be stored as UTF-8: " +
                                  std::string(py::str(why.value())));
        }
      } else if (PyBytes_Check(s.ptr())) {
        p = PyBytes_AS_STRING(s.ptr());
        len = PyBytes_GET_SIZE(s.ptr());
      } else {
        throw DTypeError("texts[" + std::to_string(i) + "] must be str or bytes, got " +
                         py::str(py::type::of(s).attr("__name__")).cast<std::string>());
      }
      t.ptrs[i] = p;
      t.lens[i] = len;
      t.keep.push_back(std::move(s));
    }
    return t;
  }
  py::buffer buf = py::reinterpret_borrow<py::buffer>(texts);
  t.data = buf.request();
  if (t.data.ndim != 1 || t.data.itemsize != 1)
    throw DTypeError("texts with offsets must be bytes-like UTF-8 data (1-D, 1 byte per item)");
  // The bytes are read as one run from the buffer's start: a strided view (memoryview[::2], a
  // reversed numpy array) would be read wrong, or before its first byte.
  if (t.data.size > 1 && t.data.strides[0] != 1)
    throw DTypeError("texts with offsets must be C-contiguous bytes-like data, got a buffer with stride " +
                     std::to_string(t.data.strides[0]) + " (copy it first, e.g. bytes(texts))");
  const auto off = as_array<int64_t>(offsets, "offsets");
  check_offsets(off, m, t.data.size, "texts");
  const char* base = static_cast<const char*>(t.data.ptr);
  for (int64_t i = 0; i < m; ++i) {
    t.ptrs[i] = base + off.data()[i];
    t.lens[i] = off.data()[i + 1] - off.data()[i];
  }
  t.keep.push_back(py::reinterpret_borrow<py::object>(texts));
  return t;
}

// Token ids for m nodes: a sequence of int sequences, or flat ids with m + 1 offsets; every id
// must fit in int32.
struct TokenArgs {
  std::vector<int32_t> ids;
  std::vector<const int32_t*> ptrs;
  std::vector<int64_t> lens;
};

// Appends ids to out, each checked to be in [0, INT32_MAX] before it is cast.
template <typename T>
void append_checked_ids(const T* data, int64_t n, const std::string& name, std::vector<int32_t>& out) {
  for (int64_t j = 0; j < n; ++j) {
    const T x = data[j];
    bool bad;
    if constexpr (std::is_signed_v<T>) {
      bad = x < 0 || x > INT32_MAX;
    } else {
      bad = x > static_cast<T>(INT32_MAX);
    }
    if (bad)
      throw InvalidValueError(name + ": token id " + std::to_string(x) + " is out of range [0, " +
                              std::to_string(INT32_MAX) + "]");
    out.push_back(static_cast<int32_t>(x));
  }
}

// Appends the token ids of obj (a 1-D integer array or sequence) to out and returns how many.
// An unsigned array is read as unsigned, not cast to int64 first (where 2**64 - 5 would be -5).
int64_t append_token_ids(py::handle obj, const std::string& name, std::vector<int32_t>& out) {
  if (auto fast = from_number_list<int64_t>(obj)) {
    append_checked_ids(fast->data(), fast->size(), name, out);
    return fast->size();
  }
  py::array arr = py::array::ensure(obj);
  if (arr && arr.ndim() == 1 && arr.size() > 0 && arr.dtype().kind() == 'u') {
    const auto u = Array<uint64_t>::ensure(arr);
    append_checked_ids(u.data(), u.size(), name, out);
    return u.size();
  }
  const auto t = as_array<int64_t>(obj, name.c_str());  // obj: an error names its own type
  append_checked_ids(t.data(), t.size(), name, out);
  return t.size();
}

TokenArgs parse_tokens(py::handle tokens, py::handle offsets, int64_t m, const char* count_name) {
  TokenArgs t;
  std::vector<int64_t> off;
  if (offsets.is_none()) {
    py::sequence seq = payload_sequence(tokens, "tokens", "token id sequences (or flat ids with offsets)");
    check_same_length(m, count_name, static_cast<int64_t>(py::len(seq)), "tokens");
    off.push_back(0);
    for (int64_t i = 0; i < m; ++i) {
      append_token_ids(seq[static_cast<size_t>(i)], "tokens[" + std::to_string(i) + "]", t.ids);
      off.push_back(static_cast<int64_t>(t.ids.size()));
    }
  } else {
    const int64_t size = append_token_ids(tokens, "tokens", t.ids);
    const auto o = as_array<int64_t>(offsets, "offsets");
    check_offsets(o, m, size, "tokens");
    off.assign(o.data(), o.data() + o.size());
  }
  t.ptrs.resize(static_cast<size_t>(m));
  t.lens.resize(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    t.ptrs[i] = t.ids.data() + off[i];
    t.lens[i] = off[i + 1] - off[i];
  }
  return t;
}

// Truthy flags (1 or 0), one per item of a sequence of length m.
std::vector<uint8_t> parse_flags(py::handle flags, int64_t m, const char* name) {
  py::sequence seq = py::reinterpret_borrow<py::sequence>(flags);
  check_same_length(m, "children", static_cast<int64_t>(py::len(seq)), name);
  std::vector<uint8_t> out(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    const int v = PyObject_IsTrue(py::object(seq[static_cast<size_t>(i)]).ptr());
    if (v < 0) throw py::error_already_set();
    out[i] = v != 0 ? 1 : 0;
  }
  return out;
}

// A path as the OS takes it: str (non-UTF-8 names arrive as surrogate escapes), bytes or PathLike.
std::string fspath(py::handle path) {
  return py::module_::import("os").attr("fsencode")(path).cast<py::bytes>().cast<std::string>();
}

// Messages and paths may hold the bytes of a non-UTF-8 file name: decoded as os.fsdecode does,
// not refused (a strict UTF-8 decode replaced the whole error with a decoding one).
py::object fs_str(const std::string& s) {
  PyObject* out = PyUnicode_DecodeFSDefaultAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
  if (out == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(out);
}

void set_error(PyObject* type, const char* what) { PyErr_SetObject(type, fs_str(what).ptr()); }

Rule parse_rule(const std::string& rule) {
  if (rule == "uct") return Rule::kUct;
  if (rule == "puct") return Rule::kPuct;
  throw InvalidValueError("rule must be 'uct' or 'puct', got '" + rule + "'");
}

// A getter: nodes -> one value per node.
template <typename T, typename Core>
py::array_t<T> get(const Forest& f, py::handle nodes, Core core) {
  auto ids = as_array<int64_t>(nodes, "nodes");
  py::array_t<T> out(ids.size());
  T* dst = out.mutable_data();
  {
    ReleaseGil nogil(ids.size(), ids);
    (f.*core)(ids.data(), ids.size(), dst);
  }
  return out;
}

// One node id given as a Python int (or an integer scalar with __index__, such as numpy's).
// bool is refused (True is no node id); an int beyond int64 is a node of no forest.
NodeId node_id(const Forest& f, py::handle obj, const char* name) {
  if (PyBool_Check(obj.ptr()))
    throw DTypeError(std::string(name) + " must be a node id (int), got bool");
  PyObject* index = PyNumber_Index(obj.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    throw DTypeError(std::string(name) + " must be a node id (int), got " +
                     py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  py::object owned = py::reinterpret_steal<py::object>(index);
  int overflow = 0;
  const long long id = PyLong_AsLongLongAndOverflow(index, &overflow);
  if (overflow != 0)
    throw UnknownNodeError(std::string(name) + " = " + py::str(owned).cast<std::string>() +
                           " is not a node of this forest (num_nodes = " + std::to_string(f.num_nodes()) + ")");
  if (id == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<NodeId>(id);
}

// parent/depth take one node (a Python int or an integer scalar such as numpy's, returning a
// Python int) or an array of nodes.
template <typename T, typename Core>
py::object get_scalar_or_array(const Forest& f, py::handle nodes, Core core) {
  const bool one = PyLong_Check(nodes.ptr()) || (PyIndex_Check(nodes.ptr()) && !py::isinstance<py::array>(nodes));
  if (one) {  // bool too: node_id refuses it
    const NodeId id = node_id(f, nodes, "nodes");
    T v;
    (f.*core)(&id, 1, &v);
    return py::int_(v);
  }
  return get<T>(f, nodes, core);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "rstar_fast C++ core: the MCTS forest (see csrc/forest.h for the semantics).";

  g_forest_error = new_exception(m, "ForestError", PyExc_ValueError, "Base of every forest error.");
  g_unknown_node_error = new_exception(m, "UnknownNodeError", g_forest_error, "A node id not in the forest.");
  g_shape_error = new_exception(m, "ShapeError", g_forest_error, "Array lengths or dimensions that do not fit.");
  g_invalid_value_error = new_exception(m, "InvalidValueError", g_forest_error,
                                        "A value outside its domain (negative count, NaN reward, bad option).");
  g_node_state_error = new_exception(m, "NodeStateError", g_forest_error,
                                     "An operation the node's state forbids (e.g. expanding it twice).");
  g_corrupt_file_error = new_exception(m, "CorruptFileError", g_forest_error,
                                       "A truncated, corrupt or foreign forest file.");
  {
    py::tuple bases = py::make_tuple(py::handle(g_forest_error), py::handle(PyExc_TypeError));
    g_dtype_error = new_exception(m, "DTypeError", bases.ptr(), "An argument of the wrong dtype or shape kind.");
  }
  g_internal_error = new_exception(m, "InternalError", g_forest_error, "A broken internal invariant (a bug).");

  m.def(
      "edit_distance_at_least",
      [](const py::str& a, const py::str& b, const py::int_& k) {
        // The code points as Python holds them (lone surrogates included, which no UTF
        // encoding would take), copied once.
        auto code_points = [](const py::str& s) {
          Py_UCS4* data = PyUnicode_AsUCS4Copy(s.ptr());
          if (data == nullptr) throw py::error_already_set();
          return std::unique_ptr<Py_UCS4, decltype(&PyMem_Free)>(data, &PyMem_Free);
        };
        const auto ca = code_points(a), cb = code_points(b);
        int overflow = 0;  // a k past int64 is as far out of reach as int64's largest
        long long bound = PyLong_AsLongLongAndOverflow(k.ptr(), &overflow);
        if (overflow != 0) bound = overflow > 0 ? std::numeric_limits<int64_t>::max() : 0;
        static_assert(sizeof(Py_UCS4) == sizeof(uint32_t));
        return edit_distance_at_least(reinterpret_cast<const uint32_t*>(ca.get()), PyUnicode_GetLength(a.ptr()),
                                      reinterpret_cast<const uint32_t*>(cb.get()), PyUnicode_GetLength(b.ptr()), bound);
      },
      py::arg("a"), py::arg("b"), py::arg("k"),
      "Whether the Levenshtein distance of two strings (in code points) is at least k.");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IoError& e) {
      py::tuple err = py::make_tuple(e.errno_value, fs_str(e.what()), fs_str(e.path));
      PyErr_SetObject(PyExc_OSError, err.ptr());
    } catch (const DTypeError& e) {
      set_error(g_dtype_error, e.what());
    } catch (const UnknownNodeError& e) {
      set_error(g_unknown_node_error, e.what());
    } catch (const ShapeError& e) {
      set_error(g_shape_error, e.what());
    } catch (const InvalidValueError& e) {
      set_error(g_invalid_value_error, e.what());
    } catch (const NodeStateError& e) {
      set_error(g_node_state_error, e.what());
    } catch (const CorruptFileError& e) {
      set_error(g_corrupt_file_error, e.what());
    } catch (const InternalError& e) {
      set_error(g_internal_error, e.what());
    } catch (const ForestError& e) {
      set_error(g_forest_error, e.what());
    }
  });

  m.attr("NO_NODE") = kNoNode;
  m.attr("FLAG_TERMINAL") = kFlagTerminal;
  m.attr("FLAG_TOO_DEEP") = kFlagTooDeep;
  m.attr("FLAG_DEAD_END") = kFlagDeadEnd;
  m.attr("FLAG_VALUED") = kFlagValued;
  m.attr("USER_FLAGS_MASK") = kUserFlagsMask;
  m.attr("STATE_FRESH") = static_cast<int>(kFresh);
  m.attr("STATE_EXPANDING") = static_cast<int>(kExpanding);
  m.attr("STATE_EXPANDED") = static_cast<int>(kExpanded);
  m.attr("BYTES_PER_NODE") = Forest::bytes_per_node();

  py::class_<Forest> cls(m, "Forest", R"doc(
Thousands of MCTS trees in one C++ arena; a batch call on 64 or more nodes releases the GIL.

Forest(c_uct=2.0, max_depth=16, virtual_loss=1.0, num_threads=0, rule="uct")
  c_uct: exploration constant; max_depth: children deeper than this are created terminal
  (the root has depth 0); virtual_loss: value of a pending visit is -virtual_loss (0: off);
  num_threads: threads per batch call, the caller included (0: all cores);
  rule: "uct" (rStar-Math, no prior) or "puct" (uses set_priors).
A node counts up to 2^32 - 256 visits (4.3 billion rollouts through it; later ones leave its
visits and Q as they are) and 2^31 - 1 pending selects; values are float32 (magnitude at most
3.4e38).
)doc");

  cls.def(py::init([](double c_uct, int max_depth, double virtual_loss, int num_threads, const std::string& rule) {
            ForestOptions o;
            o.c_uct = c_uct;
            o.max_depth = max_depth;
            o.virtual_loss = virtual_loss;
            o.num_threads = num_threads;
            o.rule = parse_rule(rule);
            return std::make_unique<Forest>(o);
          }),
          py::arg("c_uct") = 2.0, py::arg("max_depth") = 16, py::arg("virtual_loss") = 1.0,
          py::arg("num_threads") = 0, py::arg("rule") = "uct");

  cls.def_property_readonly("num_nodes", &Forest::num_nodes, "Nodes in the forest (ids are 0..num_nodes-1).")
      .def_property_readonly("num_trees", &Forest::num_trees)
      .def_property_readonly("num_threads", &Forest::num_threads)
      .def_property_readonly("c_uct", [](const Forest& f) { return f.options().c_uct; })
      .def_property_readonly("max_depth", [](const Forest& f) { return f.options().max_depth; })
      .def_property_readonly("virtual_loss", [](const Forest& f) { return f.options().virtual_loss; })
      .def_property_readonly("rule", [](const Forest& f) { return f.options().rule == Rule::kUct ? "uct" : "puct"; })
      .def_property_readonly_static("bytes_per_node", [](py::handle) { return Forest::bytes_per_node(); },
                                    "Bytes of node storage per node, payload excluded.")
      .def("__repr__", [](const Forest& f) {
        return "Forest(num_trees=" + std::to_string(f.num_trees()) + ", num_nodes=" + std::to_string(f.num_nodes()) +
               ", rule='" + (f.options().rule == Rule::kUct ? "uct" : "puct") + "')";
      });

  // ---- search ---------------------------------------------------------------------------------
  cls.def(
      "add_trees",
      [](Forest& f, int64_t n) {
        f.check_add_trees(n);  // before the output is allocated: n may be absurd
        py::array_t<int64_t> out(n);
        NodeId* dst = out.mutable_data();
        {
          ReleaseGil nogil(n);
          f.add_trees(n, dst);
        }
        return out;
      },
      py::arg("n"), "Adds n empty trees; returns their root ids (int64[n]).");

  cls.def(
      "select",
      [](Forest& f, py::handle roots) {
        auto r = as_array<int64_t>(roots, "roots");
        py::array_t<int64_t> out(r.size());
        NodeId* dst = out.mutable_data();
        {
          ReleaseGil nogil(r.size(), r);
          f.select(r.data(), r.size(), dst);
        }
        return out;
      },
      py::arg("roots"),
      "One leaf per root (-1 where the tree has nothing to select), with virtual loss on each path.\n"
      "Every selected leaf must later be ended by exactly one backprop or cancel.");

  cls.def(
      "descend",
      [](Forest& f, py::handle leaves) {
        auto l = as_array<int64_t>(leaves, "leaves");
        py::array_t<int64_t> out(l.size());
        NodeId* dst = out.mutable_data();
        {
          ReleaseGil nogil(l.size(), l);
          f.descend(l.data(), l.size(), dst);
        }
        return out;
      },
      py::arg("leaves"),
      "Continues each simulation holding leaves[i] (selected, then expanded) down to its next leaf,\n"
      "moving its end and virtual loss there (the reference's rollout goes on below the node it\n"
      "expanded). -1 where every child is terminal: the simulation still ends at leaves[i].\n"
      "Each leaf must hold a pending simulation per time it is given (claimed by the call).");

  cls.def(
      "expand",
      [](Forest& f, py::handle leaves, py::handle counts, py::handle values, py::handle texts, py::handle tokens,
         py::handle terminal) {
        auto l = as_array<int64_t>(leaves, "leaves");
        auto c = as_array<int64_t>(counts, "counts");
        auto v = as_array<float>(values, "values");
        check_same_length(l.size(), "leaves", c.size(), "counts");
        const int64_t m = v.size();
        // Payloads and terminal flags go to the core's expand, which checks them before anything
        // changes and writes them before the children are published.
        std::optional<TextArgs> tx;
        std::optional<TokenArgs> tk;
        std::vector<uint8_t> term;
        if (!texts.is_none()) tx = parse_texts(texts, py::none(), m, "values");
        if (!tokens.is_none()) tk = parse_tokens(tokens, py::none(), m, "values");
        if (!terminal.is_none()) term = parse_flags(terminal, m, "terminal");
        ExpandPayloads payloads;
        if (tx) {
          payloads.text_ptrs = tx->ptrs.data();
          payloads.text_lens = tx->lens.data();
        }
        if (tk) {
          payloads.token_ptrs = tk->ptrs.data();
          payloads.token_lens = tk->lens.data();
        }
        if (!terminal.is_none()) payloads.terminal = term.data();
        py::array_t<int64_t> out(m);
        NodeId* dst = out.mutable_data();
        {
          ReleaseGil nogil(m + l.size(), l, c, v);
          f.expand(l.data(), c.data(), l.size(), v.data(), m, dst, payloads);
        }
        return out;
      },
      py::arg("leaves"), py::arg("counts"), py::arg("values"), py::kw_only(), py::arg("texts") = py::none(),
      py::arg("tokens") = py::none(), py::arg("terminal") = py::none(),
      "Creates counts[i] children under leaves[i], in order; returns their ids (int64[sum(counts)]).\n"
      "values[j] (float32): NaN leaves child j unvisited, otherwise it is its first value and one visit.\n"
      "Children deeper than max_depth are created terminal; an expand with count 0 makes the leaf terminal.\n"
      "Optional, one per child: texts (str), tokens (int sequences), terminal (truthy marks it terminal):\n"
      "the same as set_texts / set_tokens / set_terminal on the returned ids, but checked before and\n"
      "written with the children, so no other call ever sees a child without them.");

  cls.def(
      "backprop",
      [](Forest& f, py::handle nodes, py::handle rewards, py::object leaves) {
        auto n = as_array<int64_t>(nodes, "nodes");
        auto r = as_array<float>(rewards, "rewards");
        check_same_length(n.size(), "nodes", r.size(), "rewards");
        std::optional<Array<int64_t>> l;
        if (!leaves.is_none()) {
          l = as_array<int64_t>(leaves, "leaves");
          check_same_length(n.size(), "nodes", l->size(), "leaves");
        }
        ReleaseGil nogil(n.size(), n, r, l);
        f.backprop(n.data(), r.data(), n.size(), l ? l->data() : nullptr);
      },
      py::arg("nodes"), py::arg("rewards"), py::arg("leaves") = py::none(),
      "Adds rewards[i] and one visit from nodes[i] up to its root and removes the virtual loss of the\n"
      "select it ends: the one whose leaf is nodes[i], else the one whose leaf is its parent (a child\n"
      "expand made under the leaf). leaves= names the selected leaf explicitly.");

  cls.def(
      "cancel",
      [](Forest& f, py::handle leaves) {
        auto l = as_array<int64_t>(leaves, "leaves");
        ReleaseGil nogil(l.size(), l);
        f.cancel(l.data(), l.size());
      },
      py::arg("leaves"), "Ends one pending select per leaf without adding anything (removes its virtual loss).");

  auto node_values = [](const char* values_name, void (Forest::*core)(const NodeId*, const float*, int64_t)) {
    return [values_name, core](Forest& f, py::handle nodes, py::handle values) {
      auto n = as_array<int64_t>(nodes, "nodes");
      auto v = as_array<float>(values, values_name);
      check_same_length(n.size(), "nodes", v.size(), values_name);
      ReleaseGil nogil(n.size(), n, v);
      (f.*core)(n.data(), v.data(), n.size());
    };
  };
  cls.def("update_local", node_values("values", &Forest::update_local), py::arg("nodes"), py::arg("values"),
          "Adds values[i] and one visit to nodes[i] only (a failed step's -1 on itself).");
  cls.def("update_path", node_values("values", &Forest::update_path), py::arg("nodes"), py::arg("values"),
          "Adds values[i] and one visit from nodes[i] up to its root, ending no simulation.");
  cls.def("set_priors", node_values("priors", &Forest::set_priors), py::arg("nodes"), py::arg("priors"),
          "Sets PUCT priors (default 1).");
  cls.def(
      "set_terminal",
      [](Forest& f, py::handle nodes) {
        auto n = as_array<int64_t>(nodes, "nodes");
        ReleaseGil nogil(n.size(), n);
        f.set_terminal(n.data(), n.size());
      },
      py::arg("nodes"), "Marks nodes terminal (never selected or expanded; cannot be undone).");
  cls.def(
      "set_flags",
      [](Forest& f, py::handle nodes, py::handle flags) {
        auto n = as_array<int64_t>(nodes, "nodes");
        const auto fl = as_array<int64_t>(flags, "flags");
        check_same_length(n.size(), "nodes", fl.size(), "flags");
        std::vector<uint8_t> bits(static_cast<size_t>(fl.size()));
        for (int64_t i = 0; i < fl.size(); ++i) {
          if (fl.data()[i] < 0 || fl.data()[i] > 255)
            throw InvalidValueError("flags[" + std::to_string(i) + "] = " + std::to_string(fl.data()[i]) +
                                    " is not a byte");
          bits[i] = static_cast<uint8_t>(fl.data()[i]);
        }
        ReleaseGil nogil(n.size(), n);  // bits is the binding's already
        f.set_flags(n.data(), bits.data(), n.size());
      },
      py::arg("nodes"), py::arg("flags"), "ORs user flag bits (USER_FLAGS_MASK) into nodes' flags.");

  // ---- getters --------------------------------------------------------------------------------
  cls.def("visits", [](const Forest& f, py::handle n) { return get<int64_t>(f, n, &Forest::visits); },
          py::arg("nodes"), "Completed visits (int64).");
  cls.def("q", [](const Forest& f, py::handle n) { return get<float>(f, n, &Forest::q); }, py::arg("nodes"),
          "Q = value_sum / visits, 0 when unvisited (float32).");
  cls.def("value_sums", [](const Forest& f, py::handle n) { return get<double>(f, n, &Forest::value_sum); },
          py::arg("nodes"), "Sums of values (float64).");
  cls.def("in_flight", [](const Forest& f, py::handle n) { return get<int32_t>(f, n, &Forest::in_flight); },
          py::arg("nodes"), "Pending selects through each node (int32).");
  cls.def("first_values", [](const Forest& f, py::handle n) { return get<float>(f, n, &Forest::first_value); },
          py::arg("nodes"), "Value of the first update of each node, NaN if none (float32).");
  cls.def("priors", [](const Forest& f, py::handle n) { return get<float>(f, n, &Forest::priors); },
          py::arg("nodes"));
  cls.def("flags", [](const Forest& f, py::handle n) { return get<uint8_t>(f, n, &Forest::flags); },
          py::arg("nodes"), "Flag bits (uint8): FLAG_TERMINAL, FLAG_TOO_DEEP, FLAG_DEAD_END, FLAG_VALUED, user bits (0xF0).");
  cls.def(
      "is_terminal",
      [](const Forest& f, py::handle n) {
        py::array_t<uint8_t> bits = get<uint8_t>(f, n, &Forest::is_terminal);
        return bits.attr("view")("bool");
      },
      py::arg("nodes"), "Terminal flags (bool).");
  cls.def("states", [](const Forest& f, py::handle n) { return get<uint8_t>(f, n, &Forest::state); },
          py::arg("nodes"), "STATE_FRESH / STATE_EXPANDING / STATE_EXPANDED (uint8).");
  cls.def("num_children", [](const Forest& f, py::handle n) { return get<int32_t>(f, n, &Forest::num_children); },
          py::arg("nodes"));
  cls.def("roots_of", [](const Forest& f, py::handle n) { return get<int64_t>(f, n, &Forest::root_of); },
          py::arg("nodes"), "The root of each node's tree.");
  cls.def("parent", [](const Forest& f, py::handle n) { return get_scalar_or_array<int64_t>(f, n, &Forest::parent); },
          py::arg("nodes"), "Parent id (-1 for a root): an int for an int, an int64 array for an array.");
  cls.def("depth", [](const Forest& f, py::handle n) { return get_scalar_or_array<int32_t>(f, n, &Forest::depth); },
          py::arg("nodes"), "Depth (root 0): an int for an int, an int32 array for an array.");
  cls.def(
      "children", [](const Forest& f, py::handle node) { return to_numpy(f.children(node_id(f, node, "node"))); },
      py::arg("node"),
      "Children of one node, in creation order (int64).");
  cls.def(
      "export_tree",
      [](const Forest& f, py::handle root_arg) {
        const NodeId root = node_id(f, root_arg, "root");
        TreeExport t;
        {
          py::gil_scoped_release nogil;
          t = f.export_tree(root);
        }
        py::dict d;
        d["ids"] = to_numpy(std::move(t.ids));
        d["parents"] = to_numpy(std::move(t.parents));
        d["depth"] = to_numpy(std::move(t.depth));
        d["visits"] = to_numpy(std::move(t.visits));
        d["value_sum"] = to_numpy(std::move(t.value_sum));
        d["q"] = to_numpy(std::move(t.q));
        d["first_value"] = to_numpy(std::move(t.first_value));
        d["prior"] = to_numpy(std::move(t.prior));
        py::array_t<uint8_t> flags = to_numpy(std::move(t.flags));
        d["terminal"] = (flags & py::int_(kFlagTerminal)).attr("astype")("bool");
        d["flags"] = flags;
        d["state"] = to_numpy(std::move(t.state));
        d["num_children"] = to_numpy(std::move(t.num_children));
        d["in_flight"] = to_numpy(std::move(t.in_flight));
        return d;
      },
      py::arg("root"),
      "One tree as a dict of arrays in breadth-first order (ids, parents, depth, visits, value_sum, q,\n"
      "first_value, prior, terminal, flags, state, num_children, in_flight); parents[0] == -1.");

  // ---- payloads -------------------------------------------------------------------------------
  cls.def(
      "set_texts",
      [](Forest& f, py::handle nodes, py::handle texts, py::object offsets) {
        auto n = as_array<int64_t>(nodes, "nodes");
        // The pointers and lengths are the binding's; the text bytes stay in the caller's buffer
        // (held exported, so it cannot be resized or freed; the core checks nothing in them).
        const TextArgs t = parse_texts(texts, offsets, n.size(), "nodes");
        ReleaseGil nogil(n.size(), n);
        f.set_texts(n.data(), n.size(), t.ptrs.data(), t.lens.data());
      },
      py::arg("nodes"), py::arg("texts"), py::arg("offsets") = py::none(),
      "Sets step texts: texts is a list of str (one per node), or C-contiguous UTF-8 bytes with int64\n"
      "offsets (len(nodes) + 1 entries).");

  cls.def(
      "set_tokens",
      [](Forest& f, py::handle nodes, py::handle tokens, py::object offsets) {
        auto n = as_array<int64_t>(nodes, "nodes");
        const TokenArgs t = parse_tokens(tokens, offsets, n.size(), "nodes");  // copied ids
        ReleaseGil nogil(n.size(), n);
        f.set_tokens(n.data(), n.size(), t.ptrs.data(), t.lens.data());
      },
      py::arg("nodes"), py::arg("tokens"), py::arg("offsets") = py::none(),
      "Sets token ids: flat tokens with int64 offsets (len(nodes) + 1), or, without offsets, a\n"
      "sequence of one int array per node. Token ids are in [0, 2**31 - 1].");

  auto ragged_tokens = [](Ragged<int32_t> r) { return py::make_tuple(to_numpy(std::move(r.data)), to_numpy(std::move(r.offsets))); };
  cls.def(
      "texts",
      [](const Forest& f, py::handle nodes) {
        auto n = as_array<int64_t>(nodes, "nodes");
        Ragged<char> r;
        {
          ReleaseGil nogil(n.size(), n);
          r = f.texts(n.data(), n.size());
        }
        return to_str_list(r);
      },
      py::arg("nodes"), "Step texts (list of str).");
  cls.def(
      "texts_bytes",
      [](const Forest& f, py::handle nodes) {
        auto n = as_array<int64_t>(nodes, "nodes");
        Ragged<char> r;
        {
          ReleaseGil nogil(n.size(), n);
          r = f.texts(n.data(), n.size());
        }
        std::vector<uint8_t> bytes(r.data.begin(), r.data.end());
        return py::make_tuple(to_numpy(std::move(bytes)), to_numpy(std::move(r.offsets)));
      },
      py::arg("nodes"), "Step texts as (uint8 UTF-8 data, int64 offsets).");
  cls.def(
      "tokens",
      [ragged_tokens](const Forest& f, py::handle nodes) {
        auto n = as_array<int64_t>(nodes, "nodes");
        Ragged<int32_t> r;
        {
          ReleaseGil nogil(n.size(), n);
          r = f.tokens(n.data(), n.size());
        }
        return ragged_tokens(std::move(r));
      },
      py::arg("nodes"), "Token ids as (flat int32, int64 offsets).");
  cls.def(
      "path_tokens",
      [ragged_tokens](const Forest& f, py::handle leaves) {
        auto n = as_array<int64_t>(leaves, "leaves");
        Ragged<int32_t> r;
        {
          ReleaseGil nogil(n.size(), n);
          r = f.path_tokens(n.data(), n.size());
        }
        return ragged_tokens(std::move(r));
      },
      py::arg("leaves"),
      "Root-to-leaf concatenation of token ids per leaf (the root's are the prompt):\n"
      "(flat int32, int64 offsets with len(leaves) + 1 entries).");
  cls.def(
      "path_texts",
      [](const Forest& f, py::handle leaves) {
        auto n = as_array<int64_t>(leaves, "leaves");
        Ragged<char> r;
        {
          ReleaseGil nogil(n.size(), n);
          r = f.path_texts(n.data(), n.size());
        }
        return to_str_list(r);
      },
      py::arg("leaves"), "Root-to-leaf concatenation of step texts per leaf (list of str).");

  // ---- persistence ----------------------------------------------------------------------------
  cls.def(
      "save",
      [](const Forest& f, py::handle path) {
        const std::string p = fspath(path);
        py::gil_scoped_release nogil;
        f.save(p);
      },
      py::arg("path"),
      "Writes the forest to a versioned, checksummed file (atomically, via path + '.tmp').\n"
      "Pending selects are not saved. Safe beside other calls: add_trees and expand wait while the\n"
      "nodes are copied, and every saved node comes with all of its children.");
  cls.def_static(
      "load",
      [](py::handle path, int num_threads) {
        const std::string p = fspath(path);
        py::gil_scoped_release nogil;
        return Forest::load(p, num_threads);
      },
      py::arg("path"), py::arg("num_threads") = 0,
      "Reads a forest saved by save(). Raises CorruptFileError for a truncated or corrupt file and\n"
      "OSError when the file cannot be read.");
}

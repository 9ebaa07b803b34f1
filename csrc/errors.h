// Error types of the forest core: one type per failure kind, all derived from ForestError.
// csrc/bindings.cpp maps each to a Python exception (rstar_fast._core.<Name>).
#pragma once

#include <stdexcept>
#include <string>

namespace rstar {

// Base of every error the core throws on bad input or a bad file.
class ForestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A node id that is negative or not (yet) part of this forest.
class UnknownNodeError : public ForestError {
 public:
  using ForestError::ForestError;
};

// Arrays whose lengths do not fit together (e.g. sum(counts) != len(values)).
class ShapeError : public ForestError {
 public:
  using ForestError::ForestError;
};

// A value outside its domain: a negative count, a NaN reward, a bad constructor argument.
class InvalidValueError : public ForestError {
 public:
  using ForestError::ForestError;
};

// An operation the node's state forbids: expanding an expanded or terminal node, ending a
// simulation that was never selected, selecting from a node that is not a root.
class NodeStateError : public ForestError {
 public:
  using ForestError::ForestError;
};

// A save file that is truncated, corrupt, of another version or not a forest file at all.
class CorruptFileError : public ForestError {
 public:
  using ForestError::ForestError;
};

// The file system refused (cannot open, read or write). Carries errno for Python's OSError.
class IoError : public ForestError {
 public:
  IoError(const std::string& what, int err, std::string path)
      : ForestError(what), errno_value(err), path(std::move(path)) {}
  int errno_value;
  std::string path;
};

// A broken internal invariant: a bug in the core, never the caller's fault.
class InternalError : public ForestError {
 public:
  using ForestError::ForestError;
};

}  // namespace rstar

#define RSTAR_STR2(x) #x
#define RSTAR_STR(x) RSTAR_STR2(x)
// Invariant check that names the file and line; cheap enough to keep in release builds.
#define RSTAR_CHECK(cond)                                                                  \
  do {                                                                                     \
    if (!(cond))                                                                           \
      throw ::rstar::InternalError(std::string("internal invariant failed: " #cond " at ") + \
                                   __FILE__ ":" RSTAR_STR(__LINE__));                      \
  } while (0)

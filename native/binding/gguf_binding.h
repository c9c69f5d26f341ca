// The GGUF file handle shared by the bindings that read tensors from a mapping (quant_binding.cc).
#pragma once
#include <napi.h>

#include <memory>

#include "formats/gguf.h"

namespace sonde {

class Addon;

// The file behind a GgufHandle, or null (with a JS exception thrown) if v is not one or has been
// disposed. `where` names the caller in the error.
std::shared_ptr<const GgufFile> UnwrapGgufHandle(Addon& addon, Napi::Value v, const char* where);
bool IsGgufHandle(Addon& addon, Napi::Value v);

}  // namespace sonde

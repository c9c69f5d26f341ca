// Two-way mapping between an enum and the names the JS API uses for it, from one table, so the
// parse and the print of a variant or precision name cannot drift apart.
#pragma once
#include <cstddef>
#include <string>

namespace sonde {

template <typename E>
struct EnumName {
  E value;
  const char* name;
};

template <typename E, size_t N>
bool ParseEnumName(const EnumName<E> (&table)[N], const std::string& name, E* out) {
  for (const auto& e : table) {
    if (name == e.name) {
      *out = e.value;
      return true;
    }
  }
  return false;
}

template <typename E, size_t N>
const char* EnumNameOf(const EnumName<E> (&table)[N], E value) {
  for (const auto& e : table)
    if (e.value == value) return e.name;
  return "?";
}

}  // namespace sonde

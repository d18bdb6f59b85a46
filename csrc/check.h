// Argument checks whose failure messages are built without iostreams.
//
// TORCH_CHECK(cond, a, b, ...) with more than one message argument formats them through
// c10::str, i.e. a std::ostringstream; numbers go through the stream's num_put locale facet,
// inlined from the libstdc++ headers of the compiler that built this extension. With a
// compiler whose libstdc++ differs from the one loaded at run time (seen with a custom GCC and
// torch 2.11), a failing check whose message held an integer or a shape crashed the process
// (SIGSEGV) instead of raising. MOCE_CHECK builds the text here instead, with std::to_string,
// std::snprintf and string appends only, and hands the finished std::string to
// c10::detail::torchCheckFail (what TORCH_CHECK itself calls): a c10::Error, RuntimeError in
// Python, with the same text TORCH_CHECK gave.
//
//   MOCE_CHECK(x.dim() == 4, op, ": x must be 4-D, got shape ", x.sizes());
//
// The message arguments are evaluated only when the check fails. Accepted argument types (the
// text is what operator<< on a std::ostream prints, except bool):
//   string literals, const char*, std::string, std::string_view   as is
//   char                                                         the character
//   bool                                                         true / false
//   other integral types                                         std::to_string
//   float, double, long double                                   printf %g (ostream's default)
//   c10::ScalarType                                              c10::toString: Float, Long, ...
//   c10::DeviceType                                              lower-case name: cpu, cuda, ...
//   c10::Device                                                  Device::str(): cpu, cuda:0, ...
//   c10::ArrayRef<T> (at::IntArrayRef: x.sizes())                [a, b, c]
// Anything else (a Tensor, say) is a compile error.
//
// Host code only; it compiles under nvcc as well (the .cu files use it).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace moce {

namespace detail {

template <typename T>
struct is_array_ref : std::false_type {};
template <typename T>
struct is_array_ref<c10::ArrayRef<T>> : std::true_type {};

template <typename T>
inline constexpr bool always_false = false;

template <typename T>
void append(std::string& out, const T& value) {
  using U = std::remove_cv_t<std::remove_reference_t<T>>;
  if constexpr (std::is_same_v<U, bool>) {
    out += value ? "true" : "false";
  } else if constexpr (std::is_same_v<U, char>) {
    out += value;
  } else if constexpr (std::is_integral_v<U> && std::is_signed_v<U>) {
    out += std::to_string(static_cast<long long>(value));
  } else if constexpr (std::is_integral_v<U>) {
    out += std::to_string(static_cast<unsigned long long>(value));
  } else if constexpr (std::is_floating_point_v<U>) {
    char buf[64];  // %g: at most 6 significant digits, a sign and an exponent
    if constexpr (std::is_same_v<U, long double>) {
      std::snprintf(buf, sizeof(buf), "%Lg", value);
    } else {
      std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(value));
    }
    out += buf;
  } else if constexpr (std::is_same_v<U, c10::ScalarType>) {
    out += c10::toString(value);
  } else if constexpr (std::is_same_v<U, c10::DeviceType>) {
    out += c10::DeviceTypeName(value, /*lower_case=*/true);
  } else if constexpr (std::is_same_v<U, c10::Device>) {
    out += value.str();
  } else if constexpr (is_array_ref<U>::value) {
    out += '[';
    bool first = true;
    for (const auto& e : value) {
      if (!first) out += ", ";
      first = false;
      append(out, e);
    }
    out += ']';
  } else if constexpr (std::is_pointer_v<std::decay_t<U>> &&
                       std::is_same_v<std::remove_cv_t<std::remove_pointer_t<std::decay_t<U>>>, char>) {
    // String literals (char arrays) and C strings; a null pointer adds nothing.
    const char* s = value;
    if (s != nullptr) out += s;
  } else if constexpr (std::is_convertible_v<const U&, std::string_view>) {
    out += std::string_view(value);
  } else {
    static_assert(always_false<U>, "moce::message: unsupported argument type");
  }
}

}  // namespace detail

// The concatenated text of args (see the table above); no iostreams.
template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (detail::append(out, args), ...);
  return out;
}

}  // namespace moce

// TORCH_CHECK with the message built by moce::message: throws c10::Error (RuntimeError in
// Python) with that text when cond is false; the arguments are evaluated only then.
#define MOCE_CHECK(cond, ...)                                                                           \
  do {                                                                                                  \
    if (C10_UNLIKELY(!(cond))) {                                                                        \
      ::c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__),                \
                                    ::moce::message(__VA_ARGS__));                                      \
    }                                                                                                   \
  } while (false)

// Symbol visibility for libspeclora_ops.

#pragma once

#if defined(_WIN32)
#define SPECLORA_API __declspec(dllexport)
#else
#define SPECLORA_API __attribute__((visibility("default")))
#endif

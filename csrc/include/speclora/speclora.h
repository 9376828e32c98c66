// Everything a C++ MLX program needs from speclora.

#pragma once

#include "speclora/acceptance.h"
#include "speclora/kv_cache.h"

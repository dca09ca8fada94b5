// The portable copy of the CPU kernels (the x86-64 baseline, or whatever CPU the build targets), compiled with
// -fno-trapping-math -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT (setup.py, CMakeLists.txt); run when
// at::get_cpu_capability() is DEFAULT and on CPUs without an ISA copy. See ../capability.h.
#if !defined(CPU_CAPABILITY_DEFAULT)
#error "kernels_default.cpp must be compiled with -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT"
#endif
#include "../kernels_isa.inc"

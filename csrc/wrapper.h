/* Input to bindgen (build.rs): the CUDA driver and runtime declarations p2pcheck uses.
 *
 * The driver's function-pointer types come from cudaTypedefs.h (PFN_cuXxx_vNNNN). The runtime
 * header declares plain functions, which would become link-time imports; p2pcheck dlopens
 * libcudart instead, so the pointer types for the runtime calls it makes are declared here. */
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

typedef cudaError_t (*p2pc_PFN_cudaGetDeviceCount)(int *count);
typedef cudaError_t (*p2pc_PFN_cudaSetDevice)(int device);
typedef cudaError_t (*p2pc_PFN_cudaMalloc)(void **devPtr, size_t size);
typedef cudaError_t (*p2pc_PFN_cudaFree)(void *devPtr);
typedef cudaError_t (*p2pc_PFN_cudaMemset)(void *devPtr, int value, size_t count);
typedef cudaError_t (*p2pc_PFN_cudaMemcpy)(void *dst, const void *src, size_t count,
                                           enum cudaMemcpyKind kind);
typedef cudaError_t (*p2pc_PFN_cudaDeviceSynchronize)(void);
typedef cudaError_t (*p2pc_PFN_cudaDeviceReset)(void);
typedef cudaError_t (*p2pc_PFN_cudaDeviceCanAccessPeer)(int *canAccessPeer, int device,
                                                        int peerDevice);
typedef cudaError_t (*p2pc_PFN_cudaIpcGetMemHandle)(cudaIpcMemHandle_t *handle, void *devPtr);
typedef cudaError_t (*p2pc_PFN_cudaIpcOpenMemHandle)(void **devPtr, cudaIpcMemHandle_t handle,
                                                     unsigned int flags);
typedef cudaError_t (*p2pc_PFN_cudaIpcCloseMemHandle)(void *devPtr);
typedef cudaError_t (*p2pc_PFN_cudaRuntimeGetVersion)(int *runtimeVersion);
typedef const char *(*p2pc_PFN_cudaGetErrorName)(cudaError_t error);
typedef const char *(*p2pc_PFN_cudaGetErrorString)(cudaError_t error);

/* Prints the size of every rknn struct RKLLama mirrors and the offset of every field
 * ("S name size" / "F struct field offset"), for comparison with rknn_library.py. */
#include <stddef.h>
#include <stdio.h>

#include RKNN_HEADER

#define S(type) printf("S %s %zu\n", #type, sizeof(type))
#define F(type, field) printf("F %s %s %zu\n", #type, #field, offsetof(type, field))

int main(void) {
    S(rknn_input_output_num);
    F(rknn_input_output_num, n_input);
    F(rknn_input_output_num, n_output);

    S(rknn_tensor_attr);
    F(rknn_tensor_attr, index);
    F(rknn_tensor_attr, n_dims);
    F(rknn_tensor_attr, dims);
    F(rknn_tensor_attr, name);
    F(rknn_tensor_attr, n_elems);
    F(rknn_tensor_attr, size);
    F(rknn_tensor_attr, fmt);
    F(rknn_tensor_attr, type);
    F(rknn_tensor_attr, qnt_type);
    F(rknn_tensor_attr, fl);
    F(rknn_tensor_attr, zp);
    F(rknn_tensor_attr, scale);
    F(rknn_tensor_attr, w_stride);
    F(rknn_tensor_attr, size_with_stride);
    F(rknn_tensor_attr, pass_through);
    F(rknn_tensor_attr, h_stride);

    S(rknn_input);
    F(rknn_input, index);
    F(rknn_input, buf);
    F(rknn_input, size);
    F(rknn_input, pass_through);
    F(rknn_input, type);
    F(rknn_input, fmt);

    S(rknn_output);
    F(rknn_output, want_float);
    F(rknn_output, is_prealloc);
    F(rknn_output, index);
    F(rknn_output, buf);
    F(rknn_output, size);

    S(rknn_sdk_version);
    F(rknn_sdk_version, api_version);
    F(rknn_sdk_version, drv_version);

    S(rknn_context);
    return 0;
}

/*
 * ferry-testguest boot code (AT&T syntax, assembled by rustc's global_asm!).
 *
 * Ring 0 is kept to a few dozen straight-line instructions because on the
 * target platform ring-0 code is emulated instruction by instruction.
 * Everything else runs in ring 3 with IOPL=3 and IF=0.
 *
 * Port I/O from ring 3: IOPL=3 is set, but kvm-pvm does not honour IOPL for
 * (hardware) ring 3; it does honour the TSS I/O permission bitmap, so every
 * TSS carries a full, all-zero (= all ports allowed) 8 KiB bitmap.
 *
 * GDT layout (selectors):
 *   0x00 null
 *   0x08 code64, DPL0
 *   0x10 data,   DPL0 (flat 4 GiB, also valid in 32-bit mode)
 *   0x18 code64, DPL3   (ring 3 CS = 0x1b)
 *   0x20 data,   DPL3   (ring 3 SS/DS = 0x23)
 *   0x28 code32, DPL0   (AP trampoline 16 -> 32 bit hop)
 *   0x30 + 16*i  TSS of CPU ticket i (i < 16), base filled in ring 0 at boot
 *
 * Per-CPU ring-0 area (16 KiB) at r0area + ticket*0x4000:
 *   +0x0000 TSS (104 bytes), I/O bitmap base = 0x68
 *   +0x0068 I/O permission bitmap (8 KiB of zeroes), then one 0xFF byte
 *   +0x3000 top of the ring-3 stack used to report a fault (grows down)
 *   +0x4000 top of the ring-0 stack (TSS.RSP0, grows down)
 */

        .set MAX_CPUS, 16
        .set R3_STACK_SIZE, 0x10000
        .set R0_AREA_SIZE, 0x4000
        .set IOMAP_OFF, 0x68
        .set TSS_LIMIT, 0x2068          /* TSS + 8 KiB I/O bitmap + 0xFF byte */
        .set SEL_CODE64, 0x08
        .set SEL_DATA0, 0x10
        .set SEL_CODE3, 0x1b
        .set SEL_DATA3, 0x23
        .set SEL_CODE32, 0x28
        .set SEL_TSS0, 0x30

/* ------------------------------------------------------------------ */
/* Multiboot v1 header (a.out kludge, flag bit 16) + 32-bit entries    */
/* ------------------------------------------------------------------ */
        .section .multiboot, "ax"
        .code32
        .balign 4
        .globl multiboot_header
multiboot_header:
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00010002
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)
        .long multiboot_header          /* header_addr */
        .long _image_start              /* load_addr */
        .long _load_end                 /* load_end_addr */
        .long _bss_end                  /* bss_end_addr */
        .long mb_entry                  /* entry_addr */

        .section .boot.text, "ax"
        .code32
        /* The ELF entry (e_entry), for loaders that start an ELF by its header: a Multiboot
           loader says so in EAX; anything else is taken for PVH. */
        .globl elf_entry
elf_entry:
        cmp $0x2BADB002, %eax
        je mb_entry

        .globl pvh_entry
pvh_entry:
        /* PVH: EBX = hvm_start_info */
        mov $1, %edi
        mov %ebx, %esi
        jmp common32

        .globl mb_entry
mb_entry:
        /* Multiboot: EAX = 0x2BADB002, EBX = multiboot_info */
        mov $2, %edi
        mov %ebx, %esi

common32:
        /* edi = boot protocol (0 = AP, 1 = PVH, 2 = multiboot), esi = info */
        lgdt gdt_ptr
common32_gdt_loaded:
        mov $0x620, %eax                /* CR4 = PAE | OSFXSR | OSXMMEXCPT */
        mov %eax, %cr4
        mov $pml4, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx           /* EFER.LME */
        rdmsr
        or $0x100, %eax
        wrmsr
        mov $0x80000023, %eax           /* CR0 = PG | NE | MP | PE */
        mov %eax, %cr0
        ljmp $SEL_CODE64, $long64

ap32:
        /* AP arrives here from the trampoline in 32-bit protected mode. */
        mov $SEL_DATA0, %eax
        mov %eax, %ds
        xor %edi, %edi
        jmp common32_gdt_loaded

        .code64
long64:
        mov $SEL_DATA3, %eax
        mov %eax, %ds
        mov %eax, %es
        mov $SEL_DATA0, %eax
        mov %eax, %ss
        mov $1, %eax
        lock xadd %eax, cpu_ticket(%rip)
        cmp $MAX_CPUS, %eax
        jae park
        mov %eax, %edx                  /* edx = ticket (3rd arg to rust_entry) */
        shl $14, %eax
        add $r0area, %eax               /* rax = this CPU's TSS */
        lea R0_AREA_SIZE(%rax), %rsp    /* ring-0 stack */
        mov %rsp, 4(%rax)               /* TSS.RSP0 */
        movw $IOMAP_OFF, 0x66(%rax)     /* TSS.IOPB */
        movb $0xFF, TSS_LIMIT(%rax)     /* bitmap terminator */
        mov %edx, %ecx
        shl $4, %ecx
        add $gdt_tss, %ecx              /* rcx = TSS descriptor (limit/type prefilled) */
        mov %eax, 2(%rcx)               /* base 0..31 (clobbers type byte) */
        movb $0x89, 5(%rcx)             /* type = available 64-bit TSS, present */
        shr $24, %eax
        mov %al, 7(%rcx)                /* base 24..31 */
        sub $gdt, %ecx
        ltr %cx
        lidt idt_ptr
        mov %edx, %eax
        inc %eax
        shl $16, %eax
        add $(r3stacks - 8), %eax       /* ring-3 stack top, rsp = 8 mod 16 */
        push $SEL_DATA3
        push %rax
        push $0x3002                    /* IOPL = 3, IF = 0 */
        push $SEL_CODE3
        push $rust_entry
        iretq

park:
        cli
        hlt
        jmp park

/* ------------------------------------------------------------------ */
/* Exception stubs (ring 0): build a ring-3 frame and iretq to         */
/* fault_report(vector, error, rip, cr2) on a per-CPU ring-3 stack.    */
/* ------------------------------------------------------------------ */
        .macro EXC_NOERR n
exc\n:
        push $0
        push $\n
        jmp fault_common
        .endm
        .macro EXC_ERR n
exc\n:
        push $\n
        jmp fault_common
        .endm

        EXC_NOERR 0
        EXC_NOERR 1
        EXC_NOERR 2
        EXC_NOERR 3
        EXC_NOERR 4
        EXC_NOERR 5
        EXC_NOERR 6
        EXC_NOERR 7
        EXC_ERR 8
        EXC_NOERR 9
        EXC_ERR 10
        EXC_ERR 11
        EXC_ERR 12
        EXC_ERR 13
        EXC_ERR 14
        EXC_NOERR 15
        EXC_NOERR 16
        EXC_ERR 17
        EXC_NOERR 18
        EXC_NOERR 19
        EXC_NOERR 20
        EXC_ERR 21
        EXC_NOERR 22
        EXC_NOERR 23
        EXC_NOERR 24
        EXC_NOERR 25
        EXC_NOERR 26
        EXC_NOERR 27
        EXC_NOERR 28
        EXC_ERR 29
        EXC_ERR 30
        EXC_NOERR 31

fault_common:
        lock incl fault_count(%rip)
        cmpl $1, fault_count(%rip)
        jne fault_nested                /* faulted while reporting: just power off */
        pop %rdi                        /* vector */
        pop %rsi                        /* error code */
        mov (%rsp), %rdx                /* faulting rip */
        mov %cr2, %rcx
        mov %rdi, fault_info(%rip)      /* kept for debuggers (xp fault_info) */
        mov %rsi, fault_info+8(%rip)
        mov %rdx, fault_info+16(%rip)
        mov %rcx, fault_info+24(%rip)
        /* rsp = RSP0 - 40 (frame from ring 3): fault stack = area + 0x3000 - 8 */
        lea (0x3000 - 8 - R0_AREA_SIZE + 40)(%rsp), %rax
        movq $fault_report, 0(%rsp)
        movq $SEL_CODE3, 8(%rsp)
        movq $0x3002, 16(%rsp)
        mov %rax, 24(%rsp)
        movq $SEL_DATA3, 32(%rsp)
        iretq

fault_nested:
        mov $0x604, %edx
        mov $0x2000, %eax
        out %ax, %dx
        mov $0xB004, %edx
        out %ax, %dx
        mov $0xFE, %al
        out %al, $0x64
        jmp park

/* ------------------------------------------------------------------ */
/* AP real-mode trampoline, copied to 0x8000 (SIPI vector 0x08).       */
/* ------------------------------------------------------------------ */
        .section .rodata.trampoline, "a"
        .code16
        .balign 16
        .globl ap_tramp_start
ap_tramp_start:
        lgdtl %cs:(ap_tramp_gdt_ptr - ap_tramp_start)
        mov %cr0, %eax
        or $1, %al
        mov %eax, %cr0
        ljmpl $SEL_CODE32, $ap32
        .balign 8
ap_tramp_gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
        .globl ap_tramp_end
ap_tramp_end:
        .code64

/* ------------------------------------------------------------------ */
/* Data: exception stub table, GDT, descriptor pointers, page tables   */
/* ------------------------------------------------------------------ */
        .section .rodata.exc_table, "a"
        .balign 8
        .globl exc_table
exc_table:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad exc\n
        .endr

        .section .data.gdt, "aw"
        .balign 16
        .globl gdt
gdt:
        .quad 0
        .quad 0x00AF9A000000FFFF        /* 0x08 code64 DPL0 */
        .quad 0x00CF92000000FFFF        /* 0x10 data DPL0 */
        .quad 0x00AFFA000000FFFF        /* 0x18 code64 DPL3 */
        .quad 0x00CFF2000000FFFF        /* 0x20 data DPL3 */
        .quad 0x00CF9A000000FFFF        /* 0x28 code32 DPL0 */
        .globl gdt_tss
gdt_tss:
        .rept MAX_CPUS
        .quad 0x0000890000000000 + TSS_LIMIT /* type/base filled at boot */
        .quad 0
        .endr
gdt_end:

        .balign 8
        .word 0, 0, 0
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

        .balign 8
        .word 0, 0, 0
idt_ptr:
        .word 4095
        .quad idt

        .balign 8
        .globl cpu_ticket
cpu_ticket:
        .long 0
        .globl fault_count
fault_count:
        .long 0
        .globl fault_info
fault_info:
        .quad 0, 0, 0, 0

        /* Static identity map of 0..4 GiB with 2 MiB pages, P|RW|US everywhere. */
        .section .data.pagetables, "aw"
        .balign 4096
        .globl pml4
pml4:
        .quad pdpt + 0x7
        .fill 511, 8, 0
pdpt:
        .quad pd + 0x0000 + 0x7
        .quad pd + 0x1000 + 0x7
        .quad pd + 0x2000 + 0x7
        .quad pd + 0x3000 + 0x7
        .fill 508, 8, 0
pd:
        .set i, 0
        .rept 1536
        .quad (i << 21) | 0x87          /* P | RW | US | PS */
        .set i, i + 1
        .endr
        .rept 512
        .quad (i << 21) | 0x9F          /* 3-4 GiB (MMIO): also PWT | PCD */
        .set i, i + 1
        .endr

/* ------------------------------------------------------------------ */
/* BSS: IDT, per-CPU ring-0 areas, ring-3 stacks                       */
/* ------------------------------------------------------------------ */
        .section .bss.boot, "aw", @nobits
        .balign 4096
        .globl idt
idt:
        .skip 4096
        .globl r0area
r0area:
        .skip MAX_CPUS * R0_AREA_SIZE
        .balign 4096
        .globl r3stacks
r3stacks:
        .skip MAX_CPUS * R3_STACK_SIZE

/* Xen PVH entry note */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                         /* namesz */
        .long 4                         /* descsz */
        .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .long pvh_entry
        .balign 4

        .text
